"""`qwen35-ray bench offline --context 1024 32768`: one decode step at each context length.

A GDN layer's decode step costs the same at any context (its state is fixed-size); only the
full-attention layers read every earlier token's K and V. The ratio of the step at the longest
context to the step at the shortest is therefore the attention layers' share, and this bench
measures both and that share: the step's matmuls over the earlier tokens (the attention's, the
only ones with a context-long dimension), timed under torch.profiler.

The sequences reach their context by one prefill of random tokens, exported and imported
`batch` times (each copy decodes on its own state). A checkpoint whose context is shorter than
asked for runs as a copy whose config allows it (the weights are linked, not copied): RoPE
has no learned positions, so only the declared limit changes.
"""

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

# decode steps timed per context, after WARMUP untimed ones
STEPS, WARMUP = 40, 5


def long_context_checkpoint(path: Path, context: int, out: Path) -> Path:
    """path itself when its context holds `context` tokens, else a copy of it in `out` whose
    config.json declares max_position_embeddings = context (other files linked)."""
    from qwen35_ray.model.config import ModelConfig

    if ModelConfig.from_hf(path).context_len >= context:
        return path
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    text["max_position_embeddings"] = context
    out.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def attention_ms(prof, context: int, longest: int, steps: int) -> float:
    """Per step, the self CPU time of the batched matmuls whose last dimension is a context
    length (context..longest): the attention's q.K and p.V over the earlier tokens. Nothing
    else in a decode step has such a dimension once the context is past the model's widths
    (qwen35-tiny: 1216 vocabulary, 128 hidden)."""
    total = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::bmm" and any(s and context <= s[-1] <= longest for s in e.input_shapes):
            total += e.self_cpu_time_total
    return total / 1e3 / steps


def measure(path: Path, context: int, batch: int, dtype: str, new_tokens: int) -> dict:
    from qwen35_ray.engine.llm_engine import LLMEngine
    from qwen35_ray.engine.sampling_params import SamplingParams
    from qwen35_ray.model.cache import HybridCache
    from qwen35_ray.model.config import ModelConfig

    config = ModelConfig.from_hf(path)
    room = context + new_tokens + 16
    # the default engine but sized for `batch` sequences of `room` tokens, without prefix
    # caching (its snapshots would hold a copy of the long prompt's state)
    block_bytes = HybridCache.bytes_per_block(config, 16, _dtype(dtype))
    engine = LLMEngine.from_pretrained(
        str(path),
        dtype=dtype,
        max_num_seqs=batch,
        max_model_len=room,
        kv_cache_memory_bytes=(batch * -(-room // 16) + 8) * block_bytes,
        enable_prefix_caching=False,
    )
    compiled = engine.executor.wait_compiled()
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, config.vocab_size, (context,), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("prefill", prompt, params, prefill_only=True)
    state = None
    while state is None:
        state = next((o.request_state for o in engine.step() if o.request_state), None)
    prefill_s = time.perf_counter() - start
    for i in range(batch):
        engine.import_request(dataclasses.replace(state, request_id=f"seq{i}"))
    for _ in range(WARMUP):
        engine.step()
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(10):
            engine.step()
    step_ms = 1e3 * min(times)
    return {
        "context": context,
        "batch": batch,
        "compiled": compiled,
        "step_ms_min": step_ms,
        "step_ms_median": 1e3 * statistics.median(times),
        "attention_ms": attention_ms(prof, context, context + new_tokens, 10),
        "kv_bytes_per_step": 2 * batch * context * _kv_token_bytes(config, dtype),
        "prefill_s": prefill_s,
    }


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name == "float32" else torch.bfloat16


def _kv_token_bytes(config, dtype: str) -> int:
    """K or V bytes of one token over the attention layers."""
    n = len(config.attention_layers)
    return n * config.num_key_value_heads * config.head_dim * _dtype(dtype).itemsize


def run(path: Path, contexts: list[int], batches: list[int], dtype: str) -> list[dict]:
    """One row per (batch, context), and per batch the longest over the shortest step."""
    new_tokens = WARMUP + STEPS + 10 + 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = long_context_checkpoint(path, max(contexts) + new_tokens + 16, Path(tmp) / "ckpt")
        for batch in batches:
            for context in sorted(contexts):
                print(f"[bench offline] context {context}, batch {batch} ...", flush=True)
                rows.append(measure(ckpt, context, batch, dtype, new_tokens))
                print(context_line(rows[-1]), flush=True)
    return rows


def ratios(rows: list[dict]) -> dict[int, float]:
    """Per batch: step time (min) at the longest context over the shortest."""
    out = {}
    for b in {r["batch"] for r in rows}:
        mine = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        out[b] = mine[-1]["step_ms_min"] / mine[0]["step_ms_min"]
    return out


def context_line(r: dict) -> str:
    return (
        f"context {r['context']:>6}, batch {r['batch']:>2}: decode step {r['step_ms_min']:.2f} ms "
        f"(median {r['step_ms_median']:.2f}), of which attention over the context "
        f"{r['attention_ms']:.2f} ms ({r['kv_bytes_per_step'] / 2**20:.0f} MiB of K/V), "
        f"prefill {r['prefill_s']:.1f} s{'' if r['compiled'] else ', eager'}"
    )
