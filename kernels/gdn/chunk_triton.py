"""Triton chunked gated delta rule for prefill (varlen, state slots), after flash-linear-attention.

Three launches over chunks of BT tokens that never cross a sequence boundary:

1. prepare, per (chunk, value head): gating (g from a/A_log/dt_bias, beta = sigmoid(b)) and the
   in-chunk cumulative log decay gc; the key's inverse L2 norm; A = beta_i k_i.k_j exp(gc_i - gc_j)
   (strictly lower) inverted as T = (I + A)^-1 in registers; the WY factors
   w = T (beta k exp(gc)) and u = T (beta v).
2. state, per (sequence, value head, V block): the only sequential part. For each chunk it saves
   the state h at the chunk start, forms v_new = u - w h and carries
   h <- exp(gc_last) h + (k exp(gc_last - gc))^T v_new. The initial state comes from the slot and
   the final state goes back to it.
3. output, per (V block, chunk, value head): o = scale * rq (exp(gc) q h + (q k^T * decay) v_new)
   with the query norm rq computed on the fly from the same K-blocked loads.

q and k are normalised by scaling with their inverse norms instead of rewriting them, so the
fused L2 norm costs one [T, H] buffer. Shapes: T tokens, H query/key heads, HV value heads
(a multiple of H), K/V head dims; states fp32.
"""

import torch
import triton
import triton.language as tl
from qwen35_kernels.triton_utils import dot
from qwen35_kernels.utils import next_pow2, prepare_chunk_indices, prepare_chunk_offsets


@triton.jit
def chunk_gdn_prepare_fwd_kernel(
    k, v, g, beta, a, b, A_log, dt_bias, gc, k_rstd, w, u, cu_seqlens, chunk_indices,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_GATING: tl.constexpr, USE_QK_L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_t, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    m_t = i_c * BT + o_i < eos - bos
    o_tok = bos + i_c * BT + o_i

    if USE_GATING:
        b_x = tl.load(a + o_tok * HV + i_hv, mask=m_t, other=0).to(tl.float32)
        b_x += tl.load(dt_bias + i_hv).to(tl.float32)
        # softplus with torch's threshold: linear above 20, where exp would lose nothing
        b_sp = tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
        b_g = -tl.exp(tl.load(A_log + i_hv).to(tl.float32)) * b_sp
        b_beta = tl.sigmoid(tl.load(b + o_tok * HV + i_hv, mask=m_t, other=0).to(tl.float32))
    else:
        b_g = tl.load(g + o_tok * HV + i_hv, mask=m_t, other=0).to(tl.float32)
        b_beta = tl.load(beta + o_tok * HV + i_hv, mask=m_t, other=0).to(tl.float32)
    b_g = tl.where(m_t, b_g, 0.0)
    b_beta = tl.where(m_t, b_beta, 0.0)
    b_gc = tl.cumsum(b_g, axis=0)
    tl.store(gc + o_tok * HV + i_hv, b_gc, mask=m_t)

    o_k = tl.arange(0, BK)
    p_k = k + (o_tok * H + i_h)[:, None] * K + o_k[None, :]
    b_k = tl.load(p_k, mask=m_t[:, None] & (o_k < K)[None, :], other=0).to(tl.float32)
    if USE_QK_L2NORM:
        b_rk = tl.rsqrt(tl.sum(b_k * b_k, axis=1) + 1e-6)
    else:
        b_rk = tl.full([BT], 1.0, tl.float32)
    # the G value heads of one key head compute the same norm; one of them stores it
    if i_hv % (HV // H) == 0:
        tl.store(k_rstd + o_tok * H + i_h, b_rk, mask=m_t)
    b_k = b_k * b_rk[:, None]
    b_kb = b_k * b_beta[:, None]

    m_lower = o_i[:, None] > o_i[None, :]
    b_A = dot(b_kb, tl.trans(b_k), PRECISION)
    # masked before exp: above the diagonal gc_i - gc_j > 0 and could overflow
    b_A = -tl.where(m_lower, b_A * tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], 0.0)), 0)
    # forward substitution, one row at a time: row i of (I + A)^-1 minus the identity
    for i in range(1, BT):
        m_row = o_i == i
        b_a = tl.sum(tl.where(m_row[:, None], b_A, 0.0), 0)
        b_a = b_a + tl.sum(b_a[:, None] * b_A, 0) * (o_i < i)
        b_A = tl.where(m_row[:, None], b_a[None, :], b_A)
    b_A += (o_i[:, None] == o_i[None, :]).to(tl.float32)

    b_w = dot(b_A, b_kb * tl.exp(b_gc)[:, None], PRECISION)
    p_w = w + (o_tok * HV + i_hv)[:, None] * K + o_k[None, :]
    tl.store(p_w, b_w.to(w.dtype.element_ty), mask=m_t[:, None] & (o_k < K)[None, :])
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = v + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        b_v = tl.load(p_v, mask=m_tv, other=0).to(tl.float32) * b_beta[:, None]
        b_u = dot(b_A, b_v, PRECISION)
        p_u = u + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        tl.store(p_u, b_u.to(u.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_gdn_fwd_h_kernel(
    k, w, u, gc, k_rstd, h, v_new, state, state_indices, has_initial_state, cu_seqlens,
    chunk_offsets,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    L = eos - bos
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    slot = tl.load(state_indices + i_n).to(tl.int64)
    p_s = state + (slot * HV + i_hv) * K * V + o_kv
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if tl.load(has_initial_state + i_n) != 0:
        b_h = tl.load(p_s, mask=m_kv, other=0).to(tl.float32)

    o_i = tl.arange(0, BT)
    for i_c in range(tl.cdiv(L, BT)):
        m_t = i_c * BT + o_i < L
        o_tok = bos + i_c * BT + o_i
        p_h = h + ((boh + i_c) * HV + i_hv) * K * V + o_kv
        tl.store(p_h, b_h.to(h.dtype.element_ty), mask=m_kv)

        m_tk = m_t[:, None] & (o_k < K)[None, :]
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_w = w + (o_tok * HV + i_hv)[:, None] * K + o_k[None, :]
        b_w = tl.load(p_w, mask=m_tk, other=0)
        p_u = u + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        b_u = tl.load(p_u, mask=m_tv, other=0).to(tl.float32)
        b_vn = b_u - dot(b_w, b_h.to(b_w.dtype), PRECISION)
        p_vn = v_new + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        tl.store(p_vn, b_vn.to(v_new.dtype.element_ty), mask=m_tv)

        last = tl.minimum(i_c * BT + BT, L) - 1
        b_glast = tl.load(gc + (bos + last) * HV + i_hv)
        b_gc = tl.load(gc + o_tok * HV + i_hv, mask=m_t, other=0)
        b_rk = tl.load(k_rstd + o_tok * H + i_h, mask=m_t, other=0)
        p_k = k + (o_tok * H + i_h)[:, None] * K + o_k[None, :]
        b_k = (tl.load(p_k, mask=m_tk, other=0).to(tl.float32) * b_rk[:, None]).to(b_w.dtype)
        b_vn = tl.where(m_tv, b_vn * tl.exp(b_glast - b_gc)[:, None], 0.0)
        b_h = b_h * tl.exp(b_glast)
        b_h += dot(tl.trans(b_k), b_vn.to(b_w.dtype), PRECISION)
    tl.store(p_s, b_h.to(state.dtype.element_ty), mask=m_kv)


@triton.jit
def chunk_gdn_fwd_o_kernel(
    q, k, v_new, h, gc, k_rstd, o, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_v, i_t, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    m_t = i_c * BT + o_i < eos - bos
    o_tok = bos + i_c * BT + o_i
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    b_qq = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_q = q + (o_tok * H + i_h)[:, None] * K + o_k[None, :]
        p_k = k + (o_tok * H + i_h)[:, None] * K + o_k[None, :]
        p_h = h + (i_t.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        b_q = tl.load(p_q, mask=m_tk, other=0)
        b_k = tl.load(p_k, mask=m_tk, other=0)
        b_h = tl.load(p_h, mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0)
        b_o += dot(b_q, b_h.to(b_q.dtype), PRECISION)
        b_s += dot(b_q, tl.trans(b_k), PRECISION)
        b_qf = b_q.to(tl.float32)
        b_qq += tl.sum(b_qf * b_qf, axis=1)

    if USE_QK_L2NORM:
        b_rq = tl.rsqrt(b_qq + 1e-6) * scale
    else:
        b_rq = tl.zeros([BT], dtype=tl.float32) + scale
    b_rk = tl.load(k_rstd + o_tok * H + i_h, mask=m_t, other=0)
    b_gc = tl.load(gc + o_tok * HV + i_hv, mask=m_t, other=0)
    b_o = b_o * (b_rq * tl.exp(b_gc))[:, None]
    # rows past the sequence end load gc = 0, so they are masked too or exp could overflow
    m_causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    b_decay = tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], 0.0))
    b_s = tl.where(m_causal, b_s * b_rq[:, None] * b_rk[None, :] * b_decay, 0.0)
    p_vn = v_new + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
    b_vn = tl.load(p_vn, mask=m_tv, other=0)
    b_o += dot(b_s.to(b_vn.dtype), b_vn, PRECISION)
    p_o = o + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_tv)


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    g: torch.Tensor | None,  # [T, HV] log decay; None to compute it from a, A_log, dt_bias
    beta: torch.Tensor | None,  # [T, HV]; None to compute sigmoid(b)
    cu_seqlens: torch.Tensor,  # [B+1]
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B]
    has_initial_state: torch.Tensor,  # [B] bool
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    *,
    a: torch.Tensor | None = None,  # [T, HV]
    b: torch.Tensor | None = None,  # [T, HV]
    A_log: torch.Tensor | None = None,  # [HV]
    dt_bias: torch.Tensor | None = None,  # [HV]
) -> torch.Tensor:
    """Returns o [T, HV, V] in v's dtype; writes each sequence's final state to its slot."""
    T, H, K = k.shape
    HV, V = v.shape[1:]
    assert HV % H == 0, f"value heads HV={HV} must be a multiple of key heads H={H}"
    use_gating = g is None
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    B = cu_seqlens.shape[0] - 1
    BT = chunk_size
    BK = next_pow2(K)
    chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
    chunk_offsets = prepare_chunk_offsets(cu_seqlens, BT)
    NT = chunk_indices.shape[0]
    # bf16 runs its dots in bf16 like flash-linear-attention; fp32 asks for full-precision dots
    precision = "ieee" if dtype == torch.float32 else "tf32"

    gc = torch.empty(T, HV, dtype=torch.float32, device=q.device)
    k_rstd = torch.empty(T, H, dtype=torch.float32, device=q.device)
    w = torch.empty(T, HV, K, dtype=dtype, device=q.device)
    u = torch.empty(T, HV, V, dtype=dtype, device=q.device)
    if use_gating:
        a, b = a.contiguous(), b.contiguous()
    else:
        g, beta = g.contiguous(), beta.contiguous()
    chunk_gdn_prepare_fwd_kernel[(NT, HV)](
        k, v, g, beta, a, b, A_log, dt_bias, gc, k_rstd, w, u, cu_seqlens, chunk_indices,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=min(64, next_pow2(V)),
        USE_GATING=use_gating, USE_QK_L2NORM=use_qk_l2norm, PRECISION=precision,
    )  # fmt: skip

    h = torch.empty(NT, HV, K, V, dtype=dtype, device=q.device)
    v_new = torch.empty_like(u)
    BV = min(32, next_pow2(V))
    chunk_gdn_fwd_h_kernel[(triton.cdiv(V, BV), B * HV)](
        k, w, u, gc, k_rstd, h, v_new, state, state_indices, has_initial_state, cu_seqlens,
        chunk_offsets, H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, PRECISION=precision,
    )  # fmt: skip

    o = torch.empty_like(v)
    BV = min(64, next_pow2(V))
    chunk_gdn_fwd_o_kernel[(triton.cdiv(V, BV), NT, HV)](
        q, k, v_new, h, gc, k_rstd, o, cu_seqlens, chunk_indices, scale,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=min(64, BK), BV=BV,
        USE_QK_L2NORM=use_qk_l2norm, PRECISION=precision,
    )  # fmt: skip
    return o
