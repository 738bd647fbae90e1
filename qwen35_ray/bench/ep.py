"""`qwen35-ray bench ep`: one workload through the offline engine at several expert-parallel
sizes (EP=1 in process, EP=N over N rank actors), side by side in one run: tokens/s, steps,
all-to-all bytes and seconds per step, and the expert load imbalance over the run."""

import argparse
import time
from pathlib import Path

import torch


def run_size(path: str, size: int, prompts, new_tokens: int, dtype: str, rank_cpus: float,
             **engine_kwargs) -> dict:  # fmt: skip
    from qwen35_ray.distributed.build import build_engine
    from qwen35_ray.distributed.config import EPConfig
    from qwen35_ray.engine.sampling_params import SamplingParams

    start = time.perf_counter()
    engine = build_engine(
        path, dtype=dtype, ep=EPConfig(size=size, num_cpus=rank_cpus), **engine_kwargs
    )
    startup = time.perf_counter() - start
    try:
        before = _a2a(engine)
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, params)
        steps = 0
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        seconds = time.perf_counter() - start
        after = _a2a(engine)
        load = _expert_load(engine)
    finally:
        engine.shutdown()
    a2a_bytes, a2a_s = after[0] - before[0], after[1] - before[1]
    row = {
        "expert_parallel_size": size,
        "startup_s": startup,
        "seconds": seconds,
        "tokens_per_s": len(prompts) * new_tokens / seconds,
        "steps": steps,
        "ms_per_step": 1000 * seconds / steps,
        # summed over the ranks: what all of them sent, and the time each spent, added up
        "all_to_all_bytes_per_step": a2a_bytes / steps,
        "all_to_all_ms_per_step_per_rank": 1000 * a2a_s / steps / size,
    }
    if load is not None:
        row.update(load.imbalance(size))
    return row


def _a2a(engine) -> tuple[int, float]:
    """(bytes sent, seconds spent) in all-to-alls so far, summed over the ranks."""
    infos = engine.rank_info() if hasattr(engine, "rank_info") else []
    return (
        sum(i.get("all_to_all_bytes", 0) for i in infos),
        sum(i.get("all_to_all_seconds", 0.0) for i in infos),
    )


def _expert_load(engine):
    if hasattr(engine, "rank_info"):
        return engine.expert_load()
    return engine.executor.expert_load()


def main(argv: list[str] | None = None) -> int:
    from qwen35_ray.bench.offline import workload
    from qwen35_ray.bench.timing import machine_info, write_report
    from qwen35_ray.model.config import ModelConfig
    from qwen35_ray.model.source import resolve_model

    p = argparse.ArgumentParser(prog="qwen35-ray bench ep", description=__doc__)
    p.add_argument("--model", default="qwen35-tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32, help="per rank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank-num-cpus", type=float, default=1.0, help="per rank; its torch threads")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    path = str(resolve_model(args.model))
    config = ModelConfig.from_hf(path)
    if not config.num_experts:
        p.error(f"{args.model} is a dense model; expert parallelism needs an MoE checkpoint")
    prompts = workload(args.num_prompts, config.vocab_size)
    if max(args.sizes) > 1:
        from qwen35_ray.distributed.build import ensure_ray
        from qwen35_ray.distributed.config import EPConfig

        # one local cluster for every size: it must hold the largest group
        ensure_ray(EPConfig(size=max(args.sizes), num_cpus=args.rank_num_cpus))
    results = []
    for size in args.sizes:
        print(f"[bench ep] EP={size}: {len(prompts)} prompts x {args.new_tokens} ...", flush=True)
        row = run_size(path, size, prompts, args.new_tokens, args.dtype, args.rank_num_cpus,
                       max_num_seqs=args.max_num_seqs)  # fmt: skip
        results.append(row)
        print(_line(row), flush=True)
    report = {
        "benchmark": "ep",
        "model": args.model,
        "num_experts": config.num_experts,
        "dtype": args.dtype,
        "num_prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "rank_num_cpus": args.rank_num_cpus,
        "ep1_torch_threads": torch.get_num_threads(),
        "machine": machine_info("cpu"),
        "results": results,
    }
    write_report(args.out, report)
    return 0


def _line(row: dict) -> str:
    line = (
        f"EP={row['expert_parallel_size']}: {row['tokens_per_s']:.1f} tok/s, "
        f"{row['steps']} steps of {row['ms_per_step']:.1f} ms, all-to-all "
        f"{row['all_to_all_bytes_per_step'] / 2**10:.1f} KiB and "
        f"{row['all_to_all_ms_per_step_per_rank']:.2f} ms per step and rank"
    )
    if "expert_max_over_mean" in row:
        line += (
            f", imbalance max/mean: experts {row['expert_max_over_mean']:.2f}, "
            f"ranks {row['rank_max_over_mean']:.2f}"
        )
    return line
