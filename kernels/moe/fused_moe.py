"""Routed expert MLP: token copies sorted by expert, one GEMM pair per expert that has tokens.

fused_moe sends CUDA tensors to the Triton grouped GEMMs of fused_moe_triton.py and others to
fused_moe_torch. On CPU, small batches (decode) avoid the per-expert Python loop, whose cost is
the loop, not the arithmetic:
- few (token, expert) pairs (`gathers_experts`): each pair's weights are gathered and the pairs
  run as two batched matrix-vector products, reading only the chosen experts (one sequence
  reads k of E);
- up to DENSE_MAX_TOKEN_EXPERTS token x expert: every expert runs densely in two batched
  matmuls and unchosen experts get weight zero.
The CPU loader keeps the routed experts as stored, row-major, unlike the other matrices
(model/linear.py): compiled, the gathered products of qwen35-tiny's shape (H 128, I 64, 16
experts, top 4) measured 0.92x the time of column-major experts at 1 token, 0.86x at 4 and
0.64x at 32; on a larger one (H 1024, I 256, 64 experts, top 8) 0.38x at 1 token. The dense
and per-expert paths measured the same either way. Whole engine: a 16-sequence decode run 14%
faster, prefill unchanged (docs/mtp.md).
"""

import torch
import torch.nn.functional as F
from qwen35_kernels.utils import use_triton

# T * E at or below which the CPU path computes every expert for every token
DENSE_MAX_TOKEN_EXPERTS = 1024


def gathers_experts(num_tokens: int, top_k: int, num_experts: int, compiled: bool = False) -> bool:
    """Whether the CPU path gathers the chosen experts' weights per (token, expert) pair.
    Eager, the gather copies each pair's weights before the products read them, which pays
    only while the pairs are few against the experts, 4 T k < E: at qwen35-tiny's shapes (E =
    16, k = 4) the dense path was the faster from one token on, with 64 experts of H 1024, I
    256, top 8 the gathered one at one token (scripts/moe_paths_cost.py --eager). Compiled
    (torch.compile), Inductor fuses the gather into the products that read it and nothing is
    copied: qwen35-tiny's decode step measured faster gathered than dense at 16 sequences (64
    pairs) and at 32 (128), so up to 8E pairs."""
    if compiled:
        return num_tokens * top_k <= 8 * num_experts
    return 4 * num_tokens * top_k < num_experts


def _gathered(x, w_gate_up, w_down, topk_weights, topk_ids):
    T, H = x.shape
    k = topk_ids.shape[1]
    pairs = topk_ids.reshape(-1)  # [T*k]
    rows = x[:, None].expand(T, k, H).reshape(T * k, 1, H)
    gate, up = torch.bmm(rows, w_gate_up[pairs].transpose(1, 2)).chunk(2, dim=-1)
    h = F.silu(gate) * up * topk_weights.reshape(-1, 1, 1).to(x.dtype)  # [T*k, 1, I]
    y = torch.bmm(h, w_down[pairs].transpose(1, 2))  # [T*k, 1, H]
    return y.view(T, k, H).sum(1)


def _dense(x, w_gate_up, w_down, topk_weights, topk_ids):
    T, H = x.shape
    E = w_gate_up.shape[0]
    # batched over experts, so each expert's weight is read as stored (flattening E * I into
    # one matmul would copy w_down, [E, H, I], on every call)
    gate, up = torch.bmm(x.expand(E, T, H), w_gate_up.transpose(1, 2)).chunk(2, dim=-1)
    weights = torch.zeros(E, T, dtype=x.dtype, device=x.device)
    weights.T.scatter_(1, topk_ids, topk_weights.to(x.dtype))
    h = F.silu(gate) * up * weights[..., None]  # [E, T, I]
    return torch.bmm(h, w_down.transpose(1, 2)).sum(0)  # [E, T, H] -> [T, H]


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
    return fused_moe_torch(x, w_gate_up, w_down, topk_weights, topk_ids)


def fused_moe_torch(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H] gate rows first
    w_down: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    T, k = topk_ids.shape
    E = w_gate_up.shape[0]
    if gathers_experts(T, k, E, compiled=torch.compiler.is_compiling()):
        return _gathered(x, w_gate_up, w_down, topk_weights, topk_ids)
    if T * E <= DENSE_MAX_TOKEN_EXPERTS:
        return _dense(x, w_gate_up, w_down, topk_weights, topk_ids)
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
