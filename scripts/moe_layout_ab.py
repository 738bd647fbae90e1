"""The routed experts' CPU layout, row-major (as the checkpoint stores them and the CPU loader
keeps them) against each expert's matrix column-major (the loader's layout before), side by side
in one process, variants alternating (docs/mtp.md).

    python scripts/moe_layout_ab.py kernel H I E TOP_K TOKENS eager|compiled
        fused_moe_torch alone on random weights, TOKENS a comma-separated list: 10th
        percentile time per call, best of three alternating rounds
    python scripts/moe_layout_ab.py engine CHECKPOINT KS c1|c16|prefill
        one engine per layout and k in KS (comma-separated): 8 prompts one at a time
        (c1, 64 new tokens, fastest and median per prompt), 32 prompts 16 at a time (c16), or
        two fresh prompts of 512 and of 2048 tokens per round (prefill); outputs compared
"""

import statistics
import sys
import time

import torch
from qwen35_kernels.moe.fused_moe import fused_moe_torch

import qwen35_ray.engine.llm_engine as llm_engine
from qwen35_ray.bench.offline_spec import prompts, run_prompts
from qwen35_ray.model.linear import column_major
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mlp import Experts

LAYOUTS = ("row", "col")


def p10(f, args: tuple, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 10]


def kernel(H: int, I: int, E: int, top_k: int, tokens: list[int], mode: str) -> None:
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 256  # one graph per layout and token count
    w_gate_up, w_down = torch.randn(E, 2 * I, H) * 0.05, torch.randn(E, H, I) * 0.05
    weights = {"row": (w_gate_up, w_down), "col": (column_major(w_gate_up), column_major(w_down))}
    f = fused_moe_torch if mode == "eager" else torch.compile(fused_moe_torch, dynamic=False)
    for T in tokens:
        x = torch.randn(T, H)
        topk_w, ids = torch.topk(torch.softmax(torch.randn(T, E), -1), top_k)
        ref = fused_moe_torch(x, w_gate_up, w_down, topk_w, ids)
        for w in weights.values():
            torch.testing.assert_close(f(x, *w, topk_w, ids), ref, rtol=1e-4, atol=1e-4)
        n = max(20, min(2000, 20000 // T))
        best = {}
        for _ in range(3):
            for name, w in weights.items():
                t = p10(f, (x, *w, topk_w, ids), n)
                best[name] = min(best.get(name, t), t)
        row, col = 1e6 * best["row"], 1e6 * best["col"]
        print(f"{mode} H {H} I {I} E {E} top {top_k}, {T} tokens: row {row:.1f} us, "
              f"column {col:.1f} us, row/column {row / col:.2f}", flush=True)  # fmt: skip


def engine(path: str, ks: list[int], what: str) -> None:
    column = {"on": False}

    def load(*args, **kwargs):
        net, config, where = load_model(*args, **kwargs)
        if column["on"]:
            with torch.no_grad():
                for m in net.modules():
                    if isinstance(m, Experts):
                        for p in m.parameters(recurse=False):
                            p.data = column_major(p.data)
        return net, config, where

    llm_engine.load_model = load
    engines = {}
    for layout in LAYOUTS:
        column["on"] = layout == "col"
        for k in ks:
            spec = {"speculative": {"method": "mtp", "num_speculative_tokens": k}} if k else {}
            e = llm_engine.LLMEngine.from_pretrained(path, dtype="float32", **spec)
            e.executor.wait_compiled()
            engines[f"{layout} k={k}"] = e
    names = list(engines)
    if what == "prefill":
        gen = torch.Generator().manual_seed(0)
        for n in (512, 2048):
            times = {v: [] for v in names}
            for r in range(6):  # fresh prompts each round: no prefix-cache hit
                work = [torch.randint(0, 1000, (n,), generator=gen).tolist() for _ in range(2)]
                for v in names if r % 2 == 0 else names[::-1]:
                    times[v].append(run_prompts(engines[v], work, 1, 1, 0.0)["seconds"])
            print(f"prefill, 2 prompts of {n} tokens: " + ", ".join(
                f"{v} {1e3 * min(t):.0f} ms fastest, {1e3 * statistics.median(t):.0f} median"
                for v, t in times.items()))  # fmt: skip
        return
    concurrency = 1 if what == "c1" else 16
    work = prompts(path, 8 if concurrency == 1 else 32, (64, 128))
    for v in names:
        run_prompts(engines[v], work[:2], 8, 1, 0.0)  # warm-up
    units = [[ids] for ids in work] if concurrency == 1 else [work]
    times = {(v, i): [] for v in names for i in range(len(units))}
    outputs = {}
    for r in range(5 if concurrency == 1 else 4):
        for i, unit in enumerate(units):
            for v in names if (r + i) % 2 == 0 else names[::-1]:
                run = run_prompts(engines[v], unit, 64, concurrency, 0.0)
                times[v, i].append(run["seconds"])
                outputs[v, i] = run["outputs"]
    for v in names:
        fast = sum(min(times[v, i]) for i in range(len(units)))
        med = sum(statistics.median(times[v, i]) for i in range(len(units)))
        print(f"{what} {v}: {len(work) * 64 / fast:.0f} tok/s fastest, "
              f"{len(work) * 64 / med:.0f} median")  # fmt: skip
    same = all(outputs[v, i] == outputs[names[0], i] for v in names for i in range(len(units)))
    print(f"outputs equal: {same}")


if __name__ == "__main__":
    if sys.argv[1] == "kernel":
        H, I, E, top_k = (int(a) for a in sys.argv[2:6])
        kernel(H, I, E, top_k, [int(t) for t in sys.argv[6].split(",")], sys.argv[7])
    else:
        engine(sys.argv[2], [int(k) for k in sys.argv[3].split(",")], sys.argv[4])
