"""The CPU MoE paths' time per call, compiled (or eager with --eager): gathered (each (token,
expert) pair's weights) against dense (every expert over every token), at the widths of a
decode step (1 token) and of a speculative verify step (k + 1 tokens). qwen35-tiny's shapes
unless given: E = 16, top-4, H = 128, I = 64 (docs/mtp.md).

    python scripts/moe_paths_cost.py [float32|bfloat16] [E H I TOP_K] [--eager]
"""

import argparse
import time

import torch
from qwen35_kernels.moe.fused_moe import _dense, _gathered


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dtype", nargs="?", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("shape", nargs="*", type=int, default=[16, 128, 64, 4], help="E H I TOP_K")
    p.add_argument("--eager", action="store_true")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    E, H, I, K = args.shape
    calls = 200 if E * H * I <= 2**20 else 10  # larger shapes: milliseconds a call
    torch.manual_seed(0)
    # row-major, as the CPU loader keeps them
    w_gate_up = torch.randn(E, 2 * I, H, dtype=dtype)
    w_down = torch.randn(E, H, I, dtype=dtype)
    paths = {"gathered": _gathered, "dense": _dense}
    if not args.eager:
        paths = {n: torch.compile(f, fullgraph=True, dynamic=False) for n, f in paths.items()}
    print(
        f"{dtype}, {'eager' if args.eager else 'compiled'}, E {E} H {H} I {I} top-{K}, "
        f"threads {torch.get_num_threads()}: median of 5 x {calls} calls, us"
    )
    for tokens in (1, 4, 8, 16, 32):
        x = torch.randn(tokens, H, dtype=dtype)
        weights = torch.rand(tokens, K, dtype=dtype)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
        call = (x, w_gate_up, w_down, weights, ids)
        torch.testing.assert_close(
            paths["gathered"](*call), paths["dense"](*call), rtol=2e-2, atol=2e-2
        )
        times = {name: [] for name in paths}
        for _ in range(5):  # interleaved
            for name, f in paths.items():
                start = time.perf_counter()
                for _ in range(calls):
                    f(*call)
                times[name].append((time.perf_counter() - start) / calls * 1e6)
        row = ", ".join(f"{n} {sorted(t)[2]:.1f}" for n, t in times.items())
        print(f"{tokens} tokens: {row}", flush=True)


if __name__ == "__main__":
    main()
