"""Triton recurrent gated delta rule for decode and speculative verification, after
flash-linear-attention's fused_recurrent.

One program per (sequence, value head, V block) keeps its [K, BV] slice of the fp32 state in
registers across the sequence's T tokens (T = 1 for plain decode), so the state is read and
written once per step; gating and the q/k L2 norm are computed in the same pass.
"""

import torch
import triton
import triton.language as tl
from qwen35_kernels.utils import next_pow2


@triton.jit
def fused_recurrent_gdn_fwd_kernel(
    q, k, v, g, beta, a, b, A_log, dt_bias, o, state, state_indices, inter, scale, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_GATING: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
    STORE_INTERMEDIATE: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = (i_nh // HV).to(tl.int64), i_nh % HV
    i_h = i_hv // (HV // H)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    slot = tl.load(state_indices + i_n).to(tl.int64)
    p_s = state + (slot * HV + i_hv) * K * V + o_kv
    b_h = tl.load(p_s, mask=m_kv, other=0).to(tl.float32)
    if USE_GATING:
        b_neg_A = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        b_dt_bias = tl.load(dt_bias + i_hv).to(tl.float32)

    for t in range(T):
        i_tok = i_n * T + t
        b_q = tl.load(q + (i_tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + (i_tok * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + (i_tok * HV + i_hv) * V + o_v, mask=m_v, other=0).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale
        if USE_GATING:
            b_x = tl.load(a + i_tok * HV + i_hv).to(tl.float32) + b_dt_bias
            # softplus with torch's threshold: linear above 20
            b_g = b_neg_A * tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
            b_beta = tl.sigmoid(tl.load(b + i_tok * HV + i_hv).to(tl.float32))
        else:
            b_g = tl.load(g + i_tok * HV + i_hv).to(tl.float32)
            b_beta = tl.load(beta + i_tok * HV + i_hv).to(tl.float32)
        b_h *= tl.exp(b_g)
        b_delta = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_beta
        b_h += b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + (i_tok * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if STORE_INTERMEDIATE:
            p_i = inter + (i_tok * HV + i_hv) * K * V + o_kv
            tl.store(p_i, b_h.to(inter.dtype.element_ty), mask=m_kv)
    tl.store(p_s, b_h.to(state.dtype.element_ty), mask=m_kv)


def fused_recurrent_gated_delta_rule_triton(
    q: torch.Tensor,  # [B, H, K] or [B, T, H, K]
    k: torch.Tensor,  # [B, H, K] or [B, T, H, K]
    v: torch.Tensor,  # [B, HV, V] or [B, T, HV, V]
    g: torch.Tensor | None,  # [B, (T,) HV] log decay; None to compute it from a
    beta: torch.Tensor | None,  # [B, (T,) HV]; None to compute sigmoid(b)
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B]
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    *,
    intermediate_states: torch.Tensor | None = None,  # [B, T, HV, K, V], written
    a: torch.Tensor | None = None,  # [B, (T,) HV]
    b: torch.Tensor | None = None,  # [B, (T,) HV]
    A_log: torch.Tensor | None = None,  # [HV]
    dt_bias: torch.Tensor | None = None,  # [HV]
) -> torch.Tensor:
    """Returns o [B, HV, V] (or [B, T, HV, V]) in v's dtype."""
    one_token = q.dim() == 3
    B, H, K = q.shape[0], k.shape[-2], k.shape[-1]
    HV, V = v.shape[-2:]
    T = 1 if one_token else q.shape[1]
    assert HV % H == 0, f"value heads HV={HV} must be a multiple of key heads H={H}"
    scale = K**-0.5 if scale is None else scale
    q, k, v = (x.contiguous() for x in (q, k, v))
    use_gating = g is None
    if use_gating:
        a, b = a.contiguous(), b.contiguous()
    else:
        g, beta = g.contiguous(), beta.contiguous()
    o = torch.empty_like(v)
    BV = min(32, next_pow2(V))
    fused_recurrent_gdn_fwd_kernel[(triton.cdiv(V, BV), B * HV)](
        q, k, v, g, beta, a, b, A_log, dt_bias, o, state, state_indices, intermediate_states,
        scale, T, H=H, HV=HV, K=K, V=V, BK=next_pow2(K), BV=BV, USE_GATING=use_gating,
        USE_QK_L2NORM=use_qk_l2norm, STORE_INTERMEDIATE=intermediate_states is not None,
    )  # fmt: skip
    return o
