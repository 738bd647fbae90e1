"""Routed expert MLP: token copies sorted by expert, one GEMM pair per expert that has tokens.

CUDA tensors go to the Triton grouped GEMMs of fused_moe_triton.py.
"""

import torch
import torch.nn.functional as F
from qwen35_kernels.utils import use_triton


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H] gate rows first
    w_down: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down(silu(gate) * up)(x[t]) over the chosen experts; [T, H]."""
    if use_triton(x):
        from qwen35_kernels.moe.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(x, w_gate_up, w_down, topk_weights, topk_ids)
    T, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // k  # token of each sorted (token, choice) pair
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start : start + n]
        gate, up = F.linear(x[rows], w_gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[e])
        y = y * topk_weights.reshape(-1)[order[start : start + n], None]
        out.index_add_(0, rows, y.to(out.dtype))
        start += n
    return out
