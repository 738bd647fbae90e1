"""`qwen35-ray bench sampler`: the batched sampler (engine/sampler.py) against the row-by-row
one it replaced (engine/sampler_reference.py), at the real vocabulary, in one process.

Logits are N(0, 1) * --scale, made once per batch size on --device. Today's sampler on a GPU is
timed as the runner ran it, with the logits copied to the host first; the new one samples where
the logits are and brings back only the token ids. Each figure is the best of --repeats calls
after one warm-up call (today's sampler at batch 64 takes tens of seconds on 2 CPU cores, so
--old-max-batch caps where it is timed).
"""

import argparse
import time
from pathlib import Path

import torch

SETTINGS = {
    "default": dict(temperature=0.6, top_p=0.95, top_k=20),
    "greedy": dict(temperature=0.0),
    "top_p": dict(temperature=1.0, top_p=0.95),
}


def best_ms(fn, inputs: tuple, device: str, repeats: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(*inputs)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*inputs)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    from qwen35_ray.bench.timing import machine_info, write_report
    from qwen35_ray.engine import sampler, sampler_reference
    from qwen35_ray.engine.executor import SampleRow
    from qwen35_ray.engine.sampling_params import SamplingParams

    p = argparse.ArgumentParser(prog="qwen35-ray bench sampler", description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=248320)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--scale", type=float, default=4.0, help="logits are N(0, 1) * scale")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of the new sampler")
    p.add_argument("--old-repeats", type=int, default=1, help="timed calls of today's sampler")
    p.add_argument("--old-max-batch", type=int, default=64, help="largest batch today's runs")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    def old(logits, rows):
        if logits.is_cuda:
            # the runner copied the logits to the host before sampling them
            logits = logits.cpu()
        return sampler_reference.sample(logits, rows)

    results = []
    gen = torch.Generator().manual_seed(42)
    for B in args.batch:
        logits = (torch.randn(B, args.vocab, generator=gen) * args.scale).to(args.device)
        for name in args.settings:
            params = SamplingParams(**SETTINGS[name])
            rows = [SampleRow(str(i), params, seed=i, position=0) for i in range(B)]
            new_ms = best_ms(sampler.sample, (logits, rows), args.device, args.repeats)
            entry = {"setting": name, **SETTINGS[name], "batch": B, "new_ms": round(new_ms, 3)}
            if B <= args.old_max_batch:
                old_ms = best_ms(old, (logits, rows), args.device, args.old_repeats)
                entry.update(old_ms=round(old_ms, 3), speedup=round(old_ms / new_ms, 1))
            results.append(entry)
            print(entry, flush=True)
    report = {
        "machine": machine_info(args.device),
        "vocab": args.vocab,
        "scale": args.scale,
        "repeats": args.repeats,
        "old_repeats": args.old_repeats,
        "results": results,
    }
    write_report(args.out, report)
    return 0
