"""Triton fused MoE after vLLM's fused_moe: softmax top-k routing and two grouped GEMMs.

Routing keeps each token's probabilities in registers and picks the k largest one by one. The
token copies are sorted by expert with block padding (align.py); each GEMM program then owns
one block of BM copies of a single expert and BN output columns. The gate_up GEMM accumulates
the gate and up columns side by side and writes silu(gate) * up, so the [T*k, 2I] activation
never reaches memory; the down GEMM scales by the routing weight, and a sum over the k copies
of each token combines them. Shapes: T tokens, E experts, k choices, H hidden, I expert width.
"""

import torch
import triton
import triton.language as tl
from qwen35_kernels.moe.align import moe_align_block_size
from qwen35_kernels.triton_utils import dot
from qwen35_kernels.utils import next_pow2


@triton.jit
def topk_softmax_fwd_kernel(
    logits, weights, ids, E: tl.constexpr, TOP_K: tl.constexpr, BE: tl.constexpr,
    BK: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BE)
    m_e = o_e < E
    b_l = tl.load(logits + i_t * E + o_e, mask=m_e, other=-float("inf")).to(tl.float32)
    b_p = tl.exp(b_l - tl.max(b_l, 0))
    b_p = b_p / tl.sum(b_p, 0)
    # probabilities are >= 0, so -1 marks padding and experts already taken
    b_p = tl.where(m_e, b_p, -1.0)
    o_j = tl.arange(0, BK)
    b_w = tl.zeros([BK], dtype=tl.float32)
    b_i = tl.zeros([BK], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        b_max = tl.max(b_p, 0)
        # the lowest index among ties, as torch.topk picks
        b_arg = tl.min(tl.where(b_p == b_max, o_e, BE), 0)
        b_w = tl.where(o_j == j, b_max, b_w)
        b_i = tl.where(o_j == j, b_arg, b_i)
        b_p = tl.where(o_e == b_arg, -1.0, b_p)
    if RENORMALIZE:
        b_w = b_w / tl.sum(b_w, 0)
    tl.store(weights + i_t * TOP_K + o_j, b_w.to(weights.dtype.element_ty), mask=o_j < TOP_K)
    tl.store(ids + i_t * TOP_K + o_j, b_i.to(ids.dtype.element_ty), mask=o_j < TOP_K)


@triton.jit
def fused_moe_fwd_kernel(
    a, w, out, topk_weights, sorted_ids, expert_ids, num_padded, num_copies,
    N: tl.constexpr, K: tl.constexpr, A_ROW_DIV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GATE_UP: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[c, n] = sum_k a[c // A_ROW_DIV, k] w[e(c), n, k] over sorted copies c; with GATE_UP,
    w holds 2N rows and out = silu(gate) * up."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    if i_m * BM >= tl.load(num_padded):
        return
    i_e = tl.load(expert_ids + i_m).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    b_tok = tl.load(sorted_ids + o_m).to(tl.int64)
    m_m = b_tok < num_copies
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    p_a = a + (b_tok // A_ROW_DIV)[:, None] * K
    p_w = w + i_e * (2 * N if GATE_UP else N) * K + o_n[None, :] * K

    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    b_up = tl.zeros([BM, BN], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(p_a + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0)
        b_w = tl.load(p_w + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0)
        b_acc += dot(b_a, b_w, PRECISION)
        if GATE_UP:
            b_wu = tl.load(p_w + N * K + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0)
            b_up += dot(b_a, b_wu, PRECISION)
    if GATE_UP:
        b_acc = b_acc * tl.sigmoid(b_acc) * b_up
    if MUL_ROUTED_WEIGHT:
        b_acc *= tl.load(topk_weights + b_tok, mask=m_m, other=0).to(tl.float32)[:, None]
    p_o = out + b_tok[:, None] * N + o_n[None, :]
    tl.store(p_o, b_acc.to(out.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def topk_softmax_triton(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [T, k] in the logits' dtype, expert ids [T, k] int64)."""
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=router_logits.dtype, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=router_logits.device)
    if T:
        topk_softmax_fwd_kernel[(T,)](
            router_logits.contiguous(), weights, ids, E=E, TOP_K=top_k, BE=next_pow2(E),
            BK=next_pow2(top_k), RENORMALIZE=renormalize,
        )  # fmt: skip
    return weights, ids


def fused_moe_triton(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H] gate rows first
    w_down: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down(silu(gate) * up)(x[t]) over the chosen experts; [T, H]."""
    T, H = x.shape
    E, I2, _ = w_gate_up.shape
    I, k = I2 // 2, topk_ids.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    # small batches (decode) leave most of a 64-row block empty
    BM = block_m or (16 if T * k <= 4 * E else 64)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, BM, E)
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty(T * k, I, dtype=x.dtype, device=x.device)  # silu(gate) * up per copy
    fused_moe_fwd_kernel[(expert_ids.shape[0], triton.cdiv(I, block_n))](
        x, w_gate_up, act, weights, sorted_ids, expert_ids, num_padded, T * k,
        N=I, K=H, A_ROW_DIV=k, BM=BM, BN=block_n, BK=block_k,
        GATE_UP=True, MUL_ROUTED_WEIGHT=False, PRECISION=precision,
    )  # fmt: skip
    # fp32 per copy so the k-way combine rounds once
    y = torch.empty(T * k, H, dtype=torch.float32, device=x.device)
    fused_moe_fwd_kernel[(expert_ids.shape[0], triton.cdiv(H, block_n))](
        act, w_down, y, weights, sorted_ids, expert_ids, num_padded, T * k,
        N=H, K=I, A_ROW_DIV=1, BM=BM, BN=block_n, BK=block_k,
        GATE_UP=False, MUL_ROUTED_WEIGHT=True, PRECISION=precision,
    )  # fmt: skip
    return y.view(T, k, H).sum(1).to(x.dtype)
