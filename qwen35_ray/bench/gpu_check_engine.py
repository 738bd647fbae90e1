"""gpu_check's engine steps: the tiny checkpoints on the device against the CPU, and a
checkpoint at Qwen3.5-35B-A3B's widths with random weights, eager and from CUDA graphs."""

import dataclasses
import gc
import json
import math
import os
import time
from pathlib import Path

import torch

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
