"""MTP speculative decoding at concurrency 1, prompt by prompt: each prompt runs through the
default engine (k = 0) and through each speculative one in turn, alternating which goes first,
`repeats` times. `bench offline --speculative` runs every variant over all the prompts in turn,
seconds apart; on this shared host the speed drifts within seconds (docs/mtp.md), so here the
variants of one prompt run back to back, and each prompt's fastest time per variant is kept
(the quiet moments) besides its median. Greedy, 64 new tokens; outputs are checked equal.
It also times every engine step of the decode phase and, within it, the call of the compiled
graph (the decode step's for k = 0, the one-forward greedy step's for k > 0), and prints their
10th percentile and median with the tokens a step emits: what a step costs apart from the
host's slow moments, and how much of it is the graph.

    python scripts/spec_interleaved.py CHECKPOINT [--ks 0 2 3] [--prompts 16] [--repeats 5]
"""

import argparse
import statistics
import time

from qwen35_ray.bench.offline_spec import prompts, run_prompts
from qwen35_ray.engine.llm_engine import LLMEngine

NEW_TOKENS = 64  # per request; the first comes from the prompt's step, the rest from decode steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--input-len", type=int, nargs=2, default=[64, 128])
    args = p.parse_args()
    work = prompts(args.checkpoint, args.prompts, tuple(args.input_len))
    engines = {}
    for k in args.ks:
        spec = {"speculative": {"method": "mtp", "num_speculative_tokens": k}} if k else {}
        engines[k] = LLMEngine.from_pretrained(args.checkpoint, dtype="float32", **spec)
        engines[k].executor.wait_compiled()
        run_prompts(engines[k], work, 2, 1, 0.0)  # warm-up, not counted
    steps = {k: _time_steps(engines[k], k) for k in args.ks}  # from here on
    times = {k: [[] for _ in work] for k in args.ks}
    outputs = {}
    for r in range(args.repeats):
        print(f"[spec_interleaved] repeat {r + 1}/{args.repeats} ...", flush=True)
        for i, ids in enumerate(work):
            for k in args.ks if (r + i) % 2 == 0 else args.ks[::-1]:
                run = run_prompts(engines[k], [ids], NEW_TOKENS, 1, 0.0)
                times[k][i].append(run["seconds"])
                outputs[k, i] = run["outputs"][0]
    same = all(outputs[k, i] == outputs[args.ks[0], i] for k in args.ks for i in range(len(work)))
    print(f"outputs equal to k={args.ks[0]}'s: {same}")
    base = args.ks[0]
    for name, pick in (("fastest", min), ("median", statistics.median)):
        total = {k: sum(pick(t) for t in times[k]) for k in args.ks}
        row = ", ".join(
            f"k={k} {1e3 * v / len(work):.1f} ms/request x{total[base] / v:.2f}"
            for k, v in total.items()
        )
        print(f"{name} per prompt: {row}")
    for k in args.ks:
        step, graph = steps[k]
        decode = [seconds for seconds, calls in step if calls]
        if not graph:
            print(f"k={k} ran no compiled graph call (its engine decoded eagerly)")
            continue
        print(
            f"k={k} decode step p10 {_ms(decode, 0.1):.2f} p50 {_ms(decode, 0.5):.2f} ms, its "
            f"graph p10 {_ms(graph, 0.1):.2f} p50 {_ms(graph, 0.5):.2f} ms, "
            f"{(NEW_TOKENS - 1) * len(work) * args.repeats / len(graph):.2f} tokens a graph call"
        )


def _time_steps(engine, k: int) -> tuple[list, list]:
    """Lists that fill with (seconds, graph calls) of each engine step and the seconds of each
    call of the compiled graph of one sequence (graph 0, the small-batch one)."""
    step, graph = [], []
    runner = engine.executor.runner
    fns = runner.compiled_verify.greedy_fns if k else runner.compiled_decode.fns
    inner, outer = fns[0], engine.step

    def timed_graph(*args):
        start = time.perf_counter()
        out = inner(*args)
        graph.append(time.perf_counter() - start)
        return out

    def timed_step():
        calls, start = len(graph), time.perf_counter()
        out = outer()
        step.append((time.perf_counter() - start, len(graph) - calls))
        return out

    fns[0], engine.step = timed_graph, timed_step
    return step, graph


def _ms(seconds: list, q: float) -> float:
    return 1e3 * sorted(seconds)[int(q * (len(seconds) - 1))]


if __name__ == "__main__":
    main()
