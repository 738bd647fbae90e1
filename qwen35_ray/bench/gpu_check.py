"""gpu_check: every GPU figure the project needs, in one command (scripts/gpu_check.sh).

Each step runs in its own process with its own time limit, so one that fails or hangs costs
only itself; every step's result (or its error and the end of its output) lands in one JSON.
`--dry-run` runs the same steps on CPU at tiny shapes (CI runs it).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from qwen35_ray.bench.gpu_check_engine import (  # noqa: F401 (steps, by name)
    _device,
    _sync,
    step_engine_graphs,
    step_engine_parity,
    step_engine_speed,
)
from qwen35_ray.serving.serve_mode import use_fast_serve

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
    # Ctrl-C's handler set, so the SIGINT below stops it even where this check was started
    # with SIGINT ignored (which Python, and so the child, would otherwise keep)
    cli = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "from ray.serve.scripts import cli; cli()")  # fmt: skip
    env = dict(os.environ)
    use_fast_serve(env)  # as the README's `serve run` (serving/serve_mode.py)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", cli, "run", str(path)], cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)  # fmt: skip
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
