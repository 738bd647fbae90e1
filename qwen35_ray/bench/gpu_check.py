"""gpu_check: every GPU figure the project needs, in one command (scripts/gpu_check.sh).

Each step runs in its own process with its own time limit, so one that fails or hangs costs
only itself; every step's result (or its error and the end of its output) lands in one JSON.
`--dry-run` runs the same steps on CPU at tiny shapes (CI runs it).
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

# in the order they run: the engine's own checks first, the longest (kernels) near the end
STEPS = (
    "facts",
    "engine_parity",
    "engine_speed",
    "engine_graphs",
    "sampler",
    "pytest_gpu",
    "bench_kernels",
    "bench_fla",
    "serve",
)

# Qwen3.5-35B-A3B's text widths (its config.json), with fewer layers
A3B_TEXT = {
    "hidden_size": 2048,
    "head_dim": 256,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "vocab_size": 248320,
    "max_position_embeddings": 262144,
    "rope_parameters": {
        "mrope_interleaved": True,
        "mrope_section": [11, 11, 10],
        "partial_rotary_factor": 0.25,
        "rope_theta": 10000000,
        "rope_type": "default",
    },
}


def _device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_facts(dry: bool) -> dict:
    import triton

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_available": torch.cuda.is_available(),
        "commit": os.environ.get("QWEN35_COMMIT"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30)
        try:
            out["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            out["nvidia_smi"] = repr(e)
    return out


def step_pytest_gpu(dry: bool) -> dict:
    xml = Path(os.environ.get("GPU_CHECK_TMP", "/tmp")) / "pytest-gpu.xml"
    # only the files that hold gpu tests: collecting the rest would import what a bare GPU
    # machine may lack (Ray, jsonschema) for tests that would be deselected anyway
    root = Path(__file__).resolve().parents[2]
    files = sorted(str(f.relative_to(root)) for f in (root / "tests").rglob("test_*.py")
                   if "mark.gpu" in f.read_text())  # fmt: skip
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
            "--continue-on-collection-errors", *files, f"--junitxml={xml}"]  # fmt: skip
    p = subprocess.run(args, capture_output=True, text=True, cwd=root)
    import xml.etree.ElementTree as ET

    cases = []
    if xml.exists():
        for tc in ET.parse(xml).getroot().iter("testcase"):
            status = "passed"
            msg = None
            for child in tc:
                if child.tag in ("failure", "error", "skipped"):
                    status = child.tag
                    msg = (child.get("message") or "")[:400]
            cases.append({"name": tc.get("name"), "status": status, "time": tc.get("time"),
                          "message": msg})  # fmt: skip
    kinds = ("passed", "failure", "error", "skipped")
    counts = {k: sum(c["status"] == k for c in cases) for k in kinds}
    return {"rc": p.returncode, "counts": counts, "cases": cases,
            "tail": (p.stdout + p.stderr)[-3000:]}  # fmt: skip


def step_bench_kernels(dry: bool) -> dict:
    """Our kernels alone: a fault in another library's kernel (fla's, in step bench_fla) ends
    its process's CUDA context, and must not take our figures with it."""
    os.environ["QWEN35_BENCH_NO_FLA"] = "1"
    from qwen35_ray.bench.kernels import run_kernel_bench

    rows = run_kernel_bench(_device(dry), quick=dry, progress=lambda m: print(m, flush=True))
    return {"rows": rows}


def step_bench_fla(dry: bool) -> dict:
    """The GDN rows again with flash-linear-attention's kernels beside ours, when installed."""
    import importlib.util

    if importlib.util.find_spec("fla") is None:
        return {"skipped": "flash-linear-attention is not installed"}
    from qwen35_ray.bench.kernels import gdn_cases, run_kernel_bench

    rows = run_kernel_bench(_device(dry), quick=dry, progress=lambda m: print(m, flush=True),
                            groups=[gdn_cases])  # fmt: skip
    return {"rows": rows}


def _greedy(llm, prompts, n):
    from qwen35_ray.engine.sampling_params import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def step_engine_parity(dry: bool) -> dict:
    """The tiny checkpoints on the device against the CPU: the same greedy tokens in fp32 (the
    gate); in bf16 the two differ in rounding, so where they first part is recorded, not judged."""
    from qwen35_ray import LLM

    prompts = ["The capital of France is", "def fib(n):", "1, 2, 3, 4,", "Hello " * 40]
    out = {}
    for name in ("qwen35-tiny", "qwen35-tiny-dense"):
        for dtype in ("float32", "bfloat16"):
            ref = _greedy(LLM(name, dtype=dtype, device="cpu", compile_decode=False), prompts, 8)
            t0 = time.perf_counter()
            llm = LLM(name, dtype=dtype, device=_device(dry), compile_decode=False)
            got = _greedy(llm, prompts, 8)
            out[f"{name}/{dtype}"] = {
                "same": [a == b for a, b in zip(ref, got)],
                "first_divergence": [_first_divergence(a, b) for a, b in zip(ref, got)],
                "seconds": time.perf_counter() - t0,
            }
            print(name, dtype, out[f"{name}/{dtype}"], flush=True)
    out["fp32_same"] = all(all(v["same"]) for k, v in out.items() if k.endswith("float32"))
    if not out["fp32_same"]:
        raise SystemExit(f"fp32 greedy tokens differ from the CPU's: {json.dumps(out)}")
    return out


def step_sampler(dry: bool) -> dict:
    """`qwen35-ray bench sampler` at the real vocabulary (V=248,320): the batched sampler on the
    device against the row loop it replaced (which copies the logits to the host)."""
    from qwen35_ray.bench.sampler import main as bench_sampler

    path = Path(os.environ.get("GPU_CHECK_TMP", "/tmp")) / "sampler.json"
    batches = ["1", "4"] if dry else ["1", "16", "64", "256"]
    rc = bench_sampler(["--device", _device(dry), "--batch", *batches, "--repeats", "3",
                        "--old-repeats", "1", "--old-max-batch", "4" if dry else "64",
                        "--out", str(path)])  # fmt: skip
    if rc:
        raise SystemExit(f"bench sampler exited with {rc}")
    return json.loads(path.read_text())


# --dry-run: the same structure at small widths
DRY_TEXT = {"hidden_size": 256, "head_dim": 64, "num_attention_heads": 4, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
            "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "vocab_size": 4096}  # fmt: skip


def write_a3b_checkpoint(out_dir: Path, layers: int, dry: bool = False) -> Path:
    """A config + tokenizer directory at 35B-A3B widths (weights come from the dummy loader)."""
    from qwen35_ray.model.tiny.checkpoint import SPECIAL_TOKENS, TEXT_CONFIG, write_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out_dir)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    text = {**TEXT_CONFIG, **A3B_TEXT, **(DRY_TEXT if dry else {}),
            "num_hidden_layers": layers, "layer_types": types,
            "model_type": "qwen3_5_moe_text", "router_aux_loss_coef": 0.001,
            "eos_token_id": ids["<|im_end|>"], "bos_token_id": None,
            "pad_token_id": None}  # fmt: skip
    raw = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
           "text_config": text, "tie_word_embeddings": False}  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    # the released checkpoints' sampling defaults
    generation = {"eos_token_id": [ids["<|im_end|>"]], "do_sample": True, "temperature": 0.6,
                  "top_k": 20, "top_p": 0.95}  # fmt: skip
    (out_dir / "generation_config.json").write_text(json.dumps(generation))
    return out_dir


def _dummy_weights():
    """Patch the loader to fill parameters with scaled random values on their device."""
    import math

    import qwen35_ray.model.loader as loader

    def fill(net, config, path, **kw):
        g = torch.Generator(device=next(net.parameters()).device).manual_seed(0)
        for name, p in net.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0.0, 2.7, generator=g)
            elif name.endswith("dt_bias") or "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)

    loader.load_weights = fill
    loader.weights_fingerprint = lambda path: "dummy"


def _a3b_engine(dry: bool, **options):
    from qwen35_ray import LLM

    _dummy_weights()
    path = write_a3b_checkpoint(Path(os.environ.get("GPU_CHECK_TMP", "/tmp")) / "a3b", 4, dry)
    return LLM(str(path), dtype="bfloat16", device=_device(dry), compile_decode=False,
               max_num_seqs=256, max_num_batched_tokens=8192,
               kv_cache_memory_bytes=(4 if not dry else 1) * 2**30, **options)  # fmt: skip


def _prompts(B: int, dry: bool, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    hi = 4000 if dry else 100000
    return [{"prompt_token_ids": torch.randint(1000, hi, (32,), generator=g).tolist()}
            for _ in range(B)]  # fmt: skip


def _decode_steps(llm, dry: bool, out: dict, cases) -> None:
    """ms per decode step: (time of n_out tokens - time of 2) / (n_out - 2), prefill cancelled."""
    from qwen35_ray.engine.sampling_params import SamplingParams

    device = _device(dry)
    sampled = llm.get_default_sampling_params()  # the checkpoint's: temperature, top_p, top_k
    for B, how in cases:
        B = min(B, 4) if dry else B
        prompts = _prompts(B, dry)
        base = sampled if how == "sampled" else SamplingParams(temperature=0.0)
        p1 = dataclasses.replace(base, max_tokens=2, ignore_eos=True)
        llm.generate(prompts, p1)
        n_out = 34 if not dry else 6
        pn = dataclasses.replace(base, max_tokens=n_out, ignore_eos=True)
        _sync(device)
        t = time.perf_counter()
        llm.generate(prompts, pn)
        _sync(device)
        t_n = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate(prompts, p1)
        _sync(device)
        t_1 = time.perf_counter() - t
        step = (t_n - t_1) / (n_out - 2)
        key = f"decode_step_B{B}_ms" + ("_sampled" if how == "sampled" else "")
        out[key] = step * 1e3
        print("decode", B, how, step * 1e3, flush=True)


DECODE_CASES = [(1, "greedy"), (16, "greedy"), (64, "greedy"), (256, "greedy"), (64, "sampled")]


def step_engine_speed(dry: bool) -> dict:
    """bf16 35B-A3B widths, few layers, random weights: decode steps and prefill."""
    from qwen35_ray.engine.sampling_params import SamplingParams

    device = _device(dry)
    t0 = time.perf_counter()
    llm = _a3b_engine(dry)
    out = {"layers": 4, "load_s": time.perf_counter() - t0}
    print("loaded", out, flush=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for n in (1024, 8192) if not dry else (64,):
        ids = torch.randint(1000, 4000 if dry else 100000, (n,)).tolist()
        llm.generate({"prompt_token_ids": ids}, greedy)
        _sync(device)
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": ids[::-1]}, greedy)
        _sync(device)
        out[f"prefill_{n}_ms"] = (time.perf_counter() - t) * 1e3
        print("prefill", n, out[f"prefill_{n}_ms"], flush=True)
    _decode_steps(llm, dry, out, DECODE_CASES)
    out["profile_B16"] = _profile(llm, device, dry)
    return out


def step_engine_graphs(dry: bool) -> dict:
    """The same decode steps replayed from CUDA graphs (cuda_graphs=True), and their tokens
    against the eager engine's on one batch (bf16: where they first part is recorded)."""
    from qwen35_ray.engine.sampling_params import SamplingParams

    if dry:
        return {"skipped": "CUDA graphs need a GPU"}
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = _prompts(12, dry, seed=1)
    eager = _a3b_engine(dry)
    ref = [list(o.outputs[0].token_ids) for o in eager.generate(prompts, greedy)]
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    llm = _a3b_engine(dry, cuda_graphs=True)
    out = {"start_s": time.perf_counter() - t0}
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy)]
    out["first_divergence_vs_eager"] = [_first_divergence(a, b) for a, b in zip(ref, got)]
    _decode_steps(llm, dry, out, DECODE_CASES)
    return out


def _profile(llm, device: str, dry: bool) -> list[dict]:
    """The ops that take a 16-sequence decode's time (8 steps), by device time."""
    from torch.profiler import ProfilerActivity, profile

    from qwen35_ray.engine.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": list(range(1000, 1032))} for _ in range(16)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
        _sync(device)
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:25]:
        rows.append({"name": e.key[:80], "count": e.count, "ms": getattr(e, key) / 1e3,
                     "cpu_ms": e.cpu_time_total / 1e3})  # fmt: skip
    print(prof.key_averages().table(sort_by=key, row_limit=20)[-6000:], flush=True)
    return rows


def step_serve(dry: bool) -> dict:
    """`serve run` of the collocated app on the device, answering a chat request through HTTP."""
    import importlib.util
    import signal

    import requests
    import yaml

    missing = [m for m in ("ray", "fastapi", "starlette") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)}"}
    root = Path(__file__).resolve().parents[2]
    spec = yaml.safe_load((root / "deployments" / "qwen35.yaml").read_text())
    port = 8123
    spec["http_options"]["port"] = port
    args = spec["applications"][0]["args"]
    args["device"] = _device(dry)
    args["llm_server"]["num_gpus"] = 0 if dry else 1
    tmp = Path(os.environ.get("GPU_CHECK_TMP", "/tmp"))
    path = tmp / "gpu-check-serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = open(tmp / "gpu-check-serve.log", "w")
    cli = "from ray.serve.scripts import cli; cli()"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", cli, "run", str(path)], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    answer, first = None, None
    body = {"model": args["model"], "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello."}]}  # fmt: skip
    try:
        while time.perf_counter() - t0 < 100 and proc.poll() is None:
            try:
                r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                  timeout=15)  # fmt: skip
                if r.status_code == 200:
                    answer, first = r.json(), time.perf_counter() - t0
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        if answer is None:
            tail = (tmp / "gpu-check-serve.log").read_text()[-3000:]
            waited = time.perf_counter() - t0
            raise SystemExit(f"serve run gave no answer in {waited:.0f} s\n{tail}")
        t = time.perf_counter()
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
        again = time.perf_counter() - t
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"device": args["device"], "first_answer_s": first, "second_request_s": again,
            "second_status": r.status_code, "usage": answer.get("usage")}  # fmt: skip


def run_step(name: str, dry: bool) -> None:
    result = globals()[f"step_{name}"](dry)
    print("GPU_CHECK_RESULT " + json.dumps(result, default=str), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny shapes")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    ap.add_argument("--timeout", type=float, default=150, help="seconds per step")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all the steps")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        run_step(args.step, args.dry_run)
        return 0
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = {"dry_run": args.dry_run, "started": started, "steps": {}}
    deadline = time.perf_counter() + args.budget
    for name in args.steps:
        t0 = time.perf_counter()
        limit = min(args.timeout, deadline - t0)
        if limit < 5:
            report["steps"][name] = {"rc": "skipped", "reason": "out of --budget"}
            continue
        cmd = [sys.executable, "-m", "qwen35_ray.bench.gpu_check", "--step", name]
        cmd += ["--dry-run"] if args.dry_run else []
        print(f"== {name}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            text = p.stdout + p.stderr
            rc = p.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        result = None
        for line in text.splitlines():
            if line.startswith("GPU_CHECK_RESULT "):
                result = json.loads(line[len("GPU_CHECK_RESULT ") :])
        entry = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "result": result}
        if rc != 0 or result is None:
            entry["tail"] = text[-4000:]
        report["steps"][name] = entry
        print(f"   rc={rc} {entry['seconds']} s", flush=True)
        if result is None or rc != 0:
            print(text[-1500:], flush=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    report["summary"] = summary(report)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{args.out}:")
    for key, value in report["summary"].items():
        print(f"  {key:<34} {value}")
    return 0 if all(s["rc"] == 0 for s in report["steps"].values()) else 1


def summary(report: dict) -> dict:
    """The figures a reader looks for first, flat."""
    out = {}
    steps = report["steps"]
    for name, s in steps.items():
        out[f"step {name}"] = "ok" if s["rc"] == 0 else f"FAILED ({s['rc']})"
    facts = (steps.get("facts") or {}).get("result") or {}
    gpu, torch_v, triton_v = facts.get("gpu", "cpu"), facts.get("torch"), facts.get("triton")
    out["machine"] = f"{gpu} torch {torch_v} triton {triton_v}"
    speed = (steps.get("engine_speed") or {}).get("result") or {}
    for key, value in speed.items():
        if key.endswith("_ms") or key.endswith("_sampled"):
            out[key] = round(value, 3)
    graphs = (steps.get("engine_graphs") or {}).get("result") or {}
    for key, value in graphs.items():
        if key.startswith("decode_step"):
            out[f"graphs {key}"] = round(value, 3)
    sampler = (steps.get("sampler") or {}).get("result") or {}
    for row in sampler.get("results", []):
        if row.get("setting") == "default":
            old = f", before {row['old_ms']} ms" if "old_ms" in row else ""
            out[f"sampler default B={row['batch']}"] = f"{row['new_ms']} ms{old}"
    tests = ((steps.get("pytest_gpu") or {}).get("result") or {}).get("counts")
    if tests:
        out["pytest -m gpu"] = tests
    rows = ((steps.get("bench_kernels") or {}).get("result") or {}).get("rows") or {}
    for row in rows.get("results", []):
        if "fast_s" in row:
            fla = f" (fla {row['fla_s'] * 1e3:.3f} ms)" if "fla_s" in row else ""
            out[f"kernel {row['op']}"] = f"{row['fast_s'] * 1e3:.3f} ms{fla}"
    serve = (steps.get("serve") or {}).get("result") or {}
    if serve:
        out["serve first answer s"] = serve.get("first_answer_s", serve.get("skipped"))
    return out


if __name__ == "__main__":
    sys.exit(main())
