"""Triton kernels of the chunked gated delta rule's in-chunk part: the WY representation.

Within a chunk of BT = 64 tokens the BT rank-one delta updates collapse into

    A  = tril(diag(beta) K K^T * decay, -1)                decay_ij = exp(gc_i - gc_j)
    Ai = (I + A)^-1
    w  = Ai (beta * exp(gc) * k)                           [BT, K]
    u  = Ai (beta * v)                                     [BT, V]

with gc the cumulative log decay from the chunk start. Each step is its own launch over
(chunks x heads), so every program reads only what an earlier launch wrote:

1. rstd: the inverse L2 norms of q and k rows, fp32. The dots take q and k as they are and
   their products are scaled by the norms afterwards, in fp32, which spares a rounding of
   normalised q and k to bf16 (and their copies);
2. gates: gc per chunk (and g, beta from a/b/A_log/dt_bias when the gating is fused);
3. kkt: the strictly lower A = beta_i k_i.k_j decay_ij, fp32; one k.k product per key head
   serves its G = HV / H value heads;
4. solve_tril: Ai = (I + A)^-1 from its four 16 x 16 diagonal blocks inverted together by
   forward substitution (15 row steps on a [4, 16, 16] tile), merged blockwise with 16 x 16
   dots;
5. wu: w and u, bf16 operands (fp32 for fp32 inputs) with fp32 accumulation.

Shapes: T tokens, H key heads, HV value heads, K/V head dims; gc, beta, A fp32.
"""

import triton
import triton.language as tl
from qwen35_kernels.triton_utils import dot

# the diagonal blocks inverted by substitution; the merge runs on blocks of this size
BS = tl.constexpr(16)


@triton.jit
def chunk_gdn_rstd_fwd_kernel(
    x, rstd, n_rows, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m_r = o_r < n_rows
    b_x = tl.load(x + o_r[:, None] * K + o_k[None, :], mask=m_r[:, None] & (o_k < K)[None, :],
                  other=0).to(tl.float32)  # fmt: skip
    if USE_QK_L2NORM:
        b_r = tl.rsqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)
    else:
        b_r = tl.full([BR], 1.0, tl.float32)
    tl.store(rstd + o_r, b_r, mask=m_r)


@triton.jit
def chunk_gdn_gates_fwd_kernel(
    g, beta, a, b, A_log, dt_bias, gc, beta_out, cu_seqlens, chunk_indices,
    HV: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, USE_GATING: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0)
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    o_h = tl.arange(0, BH)
    m_t = i_c * BT + o_i < eos - bos
    m = m_t[:, None] & (o_h < HV)[None, :]
    p = (bos + i_c * BT + o_i)[:, None] * HV + o_h[None, :]
    if USE_GATING:
        b_x = tl.load(a + p, mask=m, other=0).to(tl.float32)
        b_x += tl.load(dt_bias + o_h, mask=o_h < HV, other=0).to(tl.float32)[None, :]
        # softplus with torch's threshold: linear above 20, where exp would lose nothing
        b_sp = tl.where(b_x > 20.0, b_x, tl.log(1.0 + tl.exp(tl.minimum(b_x, 20.0))))
        b_A = tl.exp(tl.load(A_log + o_h, mask=o_h < HV, other=0).to(tl.float32))
        b_g = -b_A[None, :] * b_sp
        b_beta = tl.sigmoid(tl.load(b + p, mask=m, other=0).to(tl.float32))
    else:
        b_g = tl.load(g + p, mask=m, other=0).to(tl.float32)
        b_beta = tl.load(beta + p, mask=m, other=0).to(tl.float32)
    # padding rows decay nothing and write nothing
    b_g = tl.where(m, b_g, 0.0)
    tl.store(gc + p, tl.cumsum(b_g, axis=0), mask=m)
    tl.store(beta_out + p, b_beta, mask=m)


@triton.jit
def chunk_gdn_kkt_fwd_kernel(
    k, k_rstd, beta, gc, A, cu_seqlens, chunk_indices,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    G: tl.constexpr = HV // H
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    m_t = i_c * BT + o_i < eos - bos
    o_tok = bos + i_c * BT + o_i

    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (o_tok * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0)
        b_kk += dot(b_k, tl.trans(b_k), PRECISION)
    b_rk = tl.load(k_rstd + o_tok * H + i_h, mask=m_t, other=0)
    b_kk *= b_rk[:, None] * b_rk[None, :]

    m_lower = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    for i_g in range(G):
        i_hv = i_h * G + i_g
        b_gc = tl.load(gc + o_tok * HV + i_hv, mask=m_t, other=0)
        b_beta = tl.load(beta + o_tok * HV + i_hv, mask=m_t, other=0)
        # masked before exp: above the diagonal gc_i - gc_j > 0 and could overflow
        b_decay = tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], 0.0))
        b_A = tl.where(m_lower, b_kk * b_beta[:, None] * b_decay, 0.0)
        p_A = A + (o_tok * HV + i_hv)[:, None] * BT + o_i[None, :]
        tl.store(p_A, b_A, mask=m_t[:, None])


@triton.jit
def _load_block(p_A, o_r, o_c, RS: tl.constexpr, L):
    """The 16 x 16 block of A at chunk rows o_r and columns o_c (rows past the end read 0);
    RS is the distance between rows."""
    return tl.load(p_A + o_r[:, None] * RS + o_c[None, :], mask=(o_r < L)[:, None], other=0)


@triton.jit
def _invert_diagonal_blocks(p_A, RS: tl.constexpr, L):
    """(I + A_bb)^-1 of the four 16 x 16 diagonal blocks of A at once, as one [4, 16, 16]
    tile, by forward substitution one row at a time: with Y = (I + A_bb)^-1 - I, row i of Y
    is a_i + sum_{j<i} a_ij Y_j, a_i = -(A_bb)_i. Rows past the end read 0."""
    o_b = tl.arange(0, 4)
    o_s = tl.arange(0, BS)
    o_r = o_b[:, None, None] * BS + o_s[None, :, None]  # [4, 16, 1] row in the chunk
    o_c = o_b[:, None, None] * BS + o_s[None, None, :]  # [4, 1, 16] column in the chunk
    b_Y = -tl.load(p_A + o_r * RS + o_c, mask=o_r < L, other=0)
    for i in range(1, BS):
        m_row = (o_s == i)[None, :, None]
        b_a = tl.sum(tl.where(m_row, b_Y, 0.0), 1)
        b_a = b_a + tl.sum(b_a[:, :, None] * b_Y, 1) * (o_s < i)[None, :]
        b_Y = tl.where(m_row, b_a[:, None, :], b_Y)
    b_X = b_Y + (o_s[:, None] == o_s[None, :]).to(tl.float32)[None, :, :]
    X11 = tl.sum(tl.where((o_b == 0)[:, None, None], b_X, 0.0), 0)
    X22 = tl.sum(tl.where((o_b == 1)[:, None, None], b_X, 0.0), 0)
    X33 = tl.sum(tl.where((o_b == 2)[:, None, None], b_X, 0.0), 0)
    X44 = tl.sum(tl.where((o_b == 3)[:, None, None], b_X, 0.0), 0)
    return X11, X22, X33, X44


@triton.jit
def chunk_gdn_solve_tril_fwd_kernel(
    A, Ai, cu_seqlens, chunk_indices,
    HV: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_t, i_hv = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    L = eos - bos - i_c * BT
    o_s = tl.arange(0, BS)
    o_1, o_2, o_3, o_4 = o_s, o_s + BS, o_s + 2 * BS, o_s + 3 * BS
    RS: tl.constexpr = HV * BT
    p_A = A + ((bos + i_c * BT) * HV + i_hv) * BT
    p_Ai = Ai + ((bos + i_c * BT) * HV + i_hv) * BT

    # X = (I + A)^-1 is block lower triangular: X_ii = (I + A_ii)^-1 and, below the diagonal,
    # X_ij = -X_ii sum_{j<=m<i} A_im X_mj, formed nearest the diagonal first
    X11, X22, X33, X44 = _invert_diagonal_blocks(p_A, RS, L)
    A21 = _load_block(p_A, o_2, o_1, RS, L)
    A31 = _load_block(p_A, o_3, o_1, RS, L)
    A32 = _load_block(p_A, o_3, o_2, RS, L)
    A41 = _load_block(p_A, o_4, o_1, RS, L)
    A42 = _load_block(p_A, o_4, o_2, RS, L)
    A43 = _load_block(p_A, o_4, o_3, RS, L)
    X21 = -dot(X22, dot(A21, X11, PRECISION), PRECISION)
    X32 = -dot(X33, dot(A32, X22, PRECISION), PRECISION)
    X43 = -dot(X44, dot(A43, X33, PRECISION), PRECISION)
    X31 = -dot(X33, dot(A31, X11, PRECISION) + dot(A32, X21, PRECISION), PRECISION)
    X42 = -dot(X44, dot(A42, X22, PRECISION) + dot(A43, X32, PRECISION), PRECISION)
    b_s = dot(A41, X11, PRECISION) + dot(A42, X21, PRECISION) + dot(A43, X31, PRECISION)
    X41 = -dot(X44, b_s, PRECISION)

    # every row of the chunk is written in full (zeros above the diagonal blocks), so the
    # [BT, BT] dots of the wu kernel read no stale entries
    b_0 = tl.zeros([BS, BS], dtype=tl.float32)
    _store_row(p_Ai, o_1, o_s, RS, L, X11, b_0, b_0, b_0)
    _store_row(p_Ai, o_2, o_s, RS, L, X21, X22, b_0, b_0)
    _store_row(p_Ai, o_3, o_s, RS, L, X31, X32, X33, b_0)
    _store_row(p_Ai, o_4, o_s, RS, L, X41, X42, X43, X44)


@triton.jit
def _store_row(p_Ai, o_r, o_s, RS: tl.constexpr, L, X1, X2, X3, X4):
    """One 16-row band of the inverse, its four blocks side by side."""
    p = p_Ai + o_r[:, None] * RS + o_s[None, :]
    m = (o_r < L)[:, None]
    ty = p_Ai.dtype.element_ty
    tl.store(p, X1.to(ty), mask=m)
    tl.store(p + BS, X2.to(ty), mask=m)
    tl.store(p + 2 * BS, X3.to(ty), mask=m)
    tl.store(p + 3 * BS, X4.to(ty), mask=m)


@triton.jit
def chunk_gdn_wu_fwd_kernel(
    k, k_rstd, v, beta, gc, Ai, w, u, cu_seqlens, chunk_indices,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
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

    p_Ai = Ai + (o_tok * HV + i_hv)[:, None] * BT + o_i[None, :]
    b_Ai = tl.load(p_Ai, mask=m_t[:, None], other=0)
    b_beta = tl.load(beta + o_tok * HV + i_hv, mask=m_t, other=0)
    b_kscale = b_beta * tl.exp(tl.load(gc + o_tok * HV + i_hv, mask=m_t, other=0))
    b_kscale *= tl.load(k_rstd + o_tok * H + i_h, mask=m_t, other=0)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + (o_tok * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0)
        b_k = (b_k.to(tl.float32) * b_kscale[:, None]).to(b_Ai.dtype)
        b_w = dot(b_Ai, b_k, PRECISION)
        p_w = w + (o_tok * HV + i_hv)[:, None] * K + o_k[None, :]
        tl.store(p_w, b_w.to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = v + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        b_v = (tl.load(p_v, mask=m_tv, other=0).to(tl.float32) * b_beta[:, None]).to(b_Ai.dtype)
        b_u = dot(b_Ai, b_v, PRECISION)
        p_u = u + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        tl.store(p_u, b_u.to(u.dtype.element_ty), mask=m_tv)
