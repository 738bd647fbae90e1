"""Decode steps replayed from CUDA graphs against eager ones (EngineConfig.cuda_graphs,
engine/cuda_graph.py) on one GPU: the same greedy tokens, the time of a step at each batch
size, and the start-up the capture costs. For gpu_check, or by hand:

    python -m qwen35_ray.bench.decode_graphs MODEL --dtype bfloat16 --batch 1 16 64

A step's time is measured as gpu_check measures it: (time of n new tokens - time of 2) /
(n - 2), after a warm-up generation, so prefill and the first token drop out.
"""

import argparse
import dataclasses
import gc
import json
import time

import torch

from qwen35_ray.engine.sampling_params import SamplingParams


def compare(
    model: str,
    dtype: str = "bfloat16",
    device: str = "cuda",
    batch_sizes: tuple[int, ...] = (1, 16, 64),
    new_tokens: int = 34,
    prompt_len: int = 32,
    **engine_kwargs,
) -> dict:
    """{start_s_eager, start_s_graphs, decode_step_B{B}_ms_eager, decode_step_B{B}_ms_graphs,
    tokens_equal_B{B}}: one engine with cuda_graphs=False, then one with True (not both at
    once, for memory), max_num_seqs = the largest batch."""
    from qwen35_ray import LLM

    out: dict = {"model": str(model), "dtype": dtype, "batch_sizes": list(batch_sizes)}
    tokens = {}
    for key, graphs in (("eager", False), ("graphs", True)):
        t0 = time.perf_counter()
        llm = LLM(model, dtype=dtype, device=device, cuda_graphs=graphs, compile_decode=False,
                  max_num_seqs=max(batch_sizes), **engine_kwargs)  # fmt: skip
        _sync(device)
        out[f"start_s_{key}"] = time.perf_counter() - t0
        vocab = llm.engine.config.vocab_size
        for B in batch_sizes:
            gen = torch.Generator().manual_seed(B)
            prompts = [
                {"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()}
                for _ in range(B)
            ]
            step, tokens[key, B] = _decode_step(llm, prompts, new_tokens, device)
            out[f"decode_step_B{B}_ms_{key}"] = step * 1e3
            print(key, B, f"{step * 1e3:.3f} ms", flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for B in batch_sizes:
        out[f"tokens_equal_B{B}"] = tokens["eager", B] == tokens["graphs", B]
    return out


def _decode_step(llm, prompts, n: int, device: str) -> tuple[float, list[list[int]]]:
    """Seconds per decode step of the batch, and its n greedy tokens per prompt."""
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate(prompts, greedy)
    timed = {}
    for m in (n, 2):
        _sync(device)
        t = time.perf_counter()
        outs = llm.generate(prompts, dataclasses.replace(greedy, max_tokens=m))
        _sync(device)
        timed[m] = time.perf_counter() - t, [o.outputs[0].token_ids for o in outs]
    return (timed[n][0] - timed[2][0]) / (n - 2), timed[n][1]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--new-tokens", type=int, default=34)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=4.0)
    a = p.parse_args(argv)
    out = compare(a.model, a.dtype, "cuda", tuple(a.batch), a.new_tokens,
                  max_model_len=a.max_model_len,
                  kv_cache_memory_bytes=int(a.kv_cache_gib * 2**30))  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0 if all(v for k, v in out.items() if k.startswith("tokens_equal")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
