"""The CPU MoE paths' time per call, compiled: gathered (each (token, expert) pair's weights)
against dense (every expert over every token), at the widths of a decode step (1 token) and of
a speculative verify step (k + 1 tokens). qwen35-tiny's shapes unless given: E = 16, top-4,
H = 128, I = 64 (docs/mtp.md).

    python scripts/moe_paths_cost.py [float32|bfloat16] [E H I TOP_K]
"""

import sys
import time

import torch
from qwen35_kernels.moe.fused_moe import _dense, _gathered


def main():
    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
    E, H, I, K = (int(a) for a in sys.argv[2:6]) if len(sys.argv) > 2 else (16, 128, 64, 4)
    calls = 200 if E * H * I <= 2**20 else 10  # larger shapes: milliseconds a call
    torch.manual_seed(0)
    # row-major, as the CPU loader keeps them
    w_gate_up = torch.randn(E, 2 * I, H, dtype=dtype)
    w_down = torch.randn(E, H, I, dtype=dtype)
    paths = {
        "gathered": torch.compile(_gathered, fullgraph=True, dynamic=False),
        "dense": torch.compile(_dense, fullgraph=True, dynamic=False),
    }
    print(
        f"{dtype}, E {E} H {H} I {I} top-{K}, torch threads {torch.get_num_threads()}: "
        f"median of 5 x {calls} calls, us"
    )
    for tokens in (1, 4, 8, 16, 32):
        x = torch.randn(tokens, H, dtype=dtype)
        weights = torch.rand(tokens, K, dtype=dtype)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(tokens)])
        args = (x, w_gate_up, w_down, weights, ids)
        torch.testing.assert_close(
            paths["gathered"](*args), paths["dense"](*args), rtol=2e-2, atol=2e-2
        )
        times = {name: [] for name in paths}
        for _ in range(5):  # interleaved
            for name, f in paths.items():
                start = time.perf_counter()
                for _ in range(calls):
                    f(*args)
                times[name].append((time.perf_counter() - start) / calls * 1e6)
        row = ", ".join(f"{n} {sorted(t)[2]:.1f}" for n, t in times.items())
        print(f"{tokens} tokens: {row}", flush=True)


if __name__ == "__main__":
    main()
