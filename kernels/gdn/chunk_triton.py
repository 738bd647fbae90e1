"""Triton chunked gated delta rule for prefill (varlen, state slots), after flash-linear-attention.

Chunks of BT = 64 tokens never cross a sequence boundary. The in-chunk algebra (wy_triton.py)
turns each chunk's delta updates into the WY factors w and u; then

6. fwd_h, per (V block, sequence x value head), the only sequential part: for each chunk it
   saves the state h at the chunk start, forms v_new = u - w h and carries
   h <- exp(gc_last) h + k^T (exp(gc_last - gc) v_new), the state fp32 in registers. The
   initial state comes from the sequence's slot (zeros without has_initial_state) and the final
   state goes back to it;
7. fwd_o, per (V block, chunk, value head):
   o = scale (exp(gc) q h + (q k^T * decay, causal) v_new).

Every launch reads only buffers an earlier launch wrote, and the programs of one launch write
disjoint elements, so nothing depends on the order in which programs run. Dots take bf16
operands for bf16 inputs (fp32 "ieee" for fp32 inputs) and accumulate in fp32.
Shapes: T tokens, H query/key heads, HV value heads (a multiple of H), K/V head dims.
"""

import functools

import torch
import triton
import triton.language as tl
from qwen35_kernels.gdn.wy_triton import (
    chunk_gdn_gates_fwd_kernel,
    chunk_gdn_kkt_fwd_kernel,
    chunk_gdn_rstd_fwd_kernel,
    chunk_gdn_solve_tril_fwd_kernel,
    chunk_gdn_wu_fwd_kernel,
)
from qwen35_kernels.triton_utils import dot
from qwen35_kernels.utils import next_pow2, prepare_chunk_indices, prepare_chunk_offsets

BT = 64
# fwd_h's V block, warps and pipeline stages. On two warps the dots lower to synchronous
# mma.sync rather than Hopper's asynchronous wgmma (which needs four), away from the class of
# tl.dot recurrence races Triton 3.4-3.7 showed on four warps (triton-lang/triton#9871,
# #10590) and from whatever made the old four-warp kernel unrepeatable. Compiled for sm_90 on
# CPU (Triton 3.9, its ptxas): BV=16 on one stage takes 251 registers with no spill, while BV=32
# spills 192 bytes and two stages spill 24; four warps (wgmma) at BV=32 take 160.
FWD_H_BV, FWD_H_NUM_WARPS, FWD_H_NUM_STAGES = 16, 2, 1
# warps of the chunk-parallel launches with [64, 64]-and-up dots (kkt, wu, fwd_o): four make
# a warpgroup, so their dots run on wgmma; two would put them on mma.sync too (a GPU test
# runs both to tell a compiled-code race in them from one in fwd_h)
CHUNK_NUM_WARPS = 4


@triton.jit
def chunk_gdn_fwd_h_kernel(
    k, k_rstd, w, u, gc, h, v_new, state, state_indices, has_initial_state, cu_seqlens,
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
        b_w = tl.load(w + (o_tok * HV + i_hv)[:, None] * K + o_k[None, :], mask=m_tk, other=0)
        p_u = u + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        b_vn = tl.load(p_u, mask=m_tv, other=0).to(tl.float32)
        b_vn -= dot(b_w, b_h.to(b_w.dtype), PRECISION)
        p_vn = v_new + (o_tok * HV + i_hv)[:, None] * V + o_v[None, :]
        tl.store(p_vn, b_vn.to(v_new.dtype.element_ty), mask=m_tv)

        last = tl.minimum(i_c * BT + BT, L) - 1
        b_glast = tl.load(gc + (bos + last) * HV + i_hv)
        b_gc = tl.load(gc + o_tok * HV + i_hv, mask=m_t, other=0)
        b_rk = tl.load(k_rstd + o_tok * H + i_h, mask=m_t, other=0)
        # k^T diag(exp(gc_last - gc) rk) v_new: the decay to the chunk end and k's norm go on
        # v_new's rows
        b_vn = tl.where(m_tv, b_vn * (tl.exp(b_glast - b_gc) * b_rk)[:, None], 0.0)
        # k^T loaded transposed, [BK, BT]
        p_k = k + (o_tok * H + i_h)[None, :] * K + o_k[:, None]
        b_kt = tl.load(p_k, mask=(o_k < K)[:, None] & m_t[None, :], other=0)
        b_h = b_h * tl.exp(b_glast) + dot(b_kt, b_vn.to(b_kt.dtype), PRECISION)
    tl.store(p_s, b_h.to(state.dtype.element_ty), mask=m_kv)


@triton.jit
def chunk_gdn_fwd_o_kernel(
    q, k, q_rstd, k_rstd, v_new, h, gc, o, cu_seqlens, chunk_indices, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
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
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_q = tl.load(q + (o_tok * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0)
        b_k = tl.load(k + (o_tok * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0)
        p_h = h + (i_t.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_h, mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0)
        b_o += dot(b_q, b_h, PRECISION)
        b_s += dot(b_q, tl.trans(b_k), PRECISION)

    b_gc = tl.load(gc + o_tok * HV + i_hv, mask=m_t, other=0)
    b_rq = tl.load(q_rstd + o_tok * H + i_h, mask=m_t, other=0) * scale
    b_rk = tl.load(k_rstd + o_tok * H + i_h, mask=m_t, other=0)
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
    """Returns o [T, HV, V] in v's dtype; writes each sequence's final state to its slot.
    The state slots of one call must be distinct: each sequence's programs read and write
    its slot in place."""
    return _chunk_fwd(
        q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state, scale,
        use_qk_l2norm, chunk_size, a, b, A_log, dt_bias,
    )[0]  # fmt: skip


def _chunk_fwd(
    q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state, scale,
    use_qk_l2norm, chunk_size, a, b, A_log, dt_bias,
):  # fmt: skip
    """The launches in order. Returns o, every intermediate buffer by name and every launch as
    (name, callable) to rerun it alone on the same buffers (for tests and benchmarks)."""
    T, H, K = k.shape
    HV, V = v.shape[1:]
    assert HV % H == 0, f"value heads HV={HV} must be a multiple of key heads H={H}"
    assert chunk_size == BT, f"the Triton chunk kernels use {BT}-token chunks, not {chunk_size}"
    scale = K**-0.5 if scale is None else scale
    dtype = v.dtype
    dev = v.device
    B = cu_seqlens.shape[0] - 1
    BK = next_pow2(K)
    chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
    chunk_offsets = prepare_chunk_offsets(cu_seqlens, BT)
    NT = chunk_indices.shape[0]
    # bf16 operands go to the tensor cores as they are; fp32 asks for full-precision dots.
    # The fp32 dots of the triangular solve run as tf32 for bf16 inputs: its result is
    # rounded to bf16 anyway.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    launches = []

    def launch(name, kernel, grid, *args, **kwargs):
        run = functools.partial(kernel[grid], *args, **kwargs)
        launches.append((name, run))
        run()

    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    q_rstd, k_rstd = (torch.empty(T, H, dtype=torch.float32, device=dev) for _ in range(2))
    BR = 16
    for name, x, r in (("rstd_q", q, q_rstd), ("rstd_k", k, k_rstd)):
        launch(
            name, chunk_gdn_rstd_fwd_kernel, (triton.cdiv(T * H, BR),),
            x, r, T * H, K=K, BR=BR, BK=BK, USE_QK_L2NORM=use_qk_l2norm,
        )  # fmt: skip

    use_gating = g is None
    if use_gating:
        a, b = a.contiguous(), b.contiguous()
    else:
        g, beta = g.contiguous(), beta.contiguous()
    gc = torch.empty(T, HV, dtype=torch.float32, device=dev)
    beta_f = torch.empty(T, HV, dtype=torch.float32, device=dev)
    launch(
        "gates", chunk_gdn_gates_fwd_kernel, (NT,),
        g, beta, a, b, A_log, dt_bias, gc, beta_f, cu_seqlens, chunk_indices,
        HV=HV, BT=BT, BH=next_pow2(HV), USE_GATING=use_gating,
    )  # fmt: skip

    A = torch.empty(T, HV, BT, dtype=torch.float32, device=dev)
    launch(
        "kkt", chunk_gdn_kkt_fwd_kernel, (NT, H),
        k, k_rstd, beta_f, gc, A, cu_seqlens, chunk_indices,
        H=H, HV=HV, K=K, BT=BT, BK=min(64, BK), PRECISION=precision, num_warps=CHUNK_NUM_WARPS,
    )  # fmt: skip
    Ai = torch.empty(T, HV, BT, dtype=dtype, device=dev)
    launch(
        "solve_tril", chunk_gdn_solve_tril_fwd_kernel, (NT, HV),
        A, Ai, cu_seqlens, chunk_indices, HV=HV, BT=BT, PRECISION=precision,
    )  # fmt: skip
    w = torch.empty(T, HV, K, dtype=dtype, device=dev)
    u = torch.empty(T, HV, V, dtype=dtype, device=dev)
    launch(
        "wu", chunk_gdn_wu_fwd_kernel, (NT, HV),
        k, k_rstd, v, beta_f, gc, Ai, w, u, cu_seqlens, chunk_indices,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=min(64, BK), BV=min(64, next_pow2(V)),
        PRECISION=precision, num_warps=CHUNK_NUM_WARPS,
    )  # fmt: skip

    h = torch.empty(NT, HV, K, V, dtype=dtype, device=dev)
    v_new = torch.empty_like(u)
    BV = min(FWD_H_BV, next_pow2(V))
    launch(
        "fwd_h", chunk_gdn_fwd_h_kernel, (triton.cdiv(V, BV), B * HV),
        k, k_rstd, w, u, gc, h, v_new, state, state_indices, has_initial_state, cu_seqlens,
        chunk_offsets, H=H, HV=HV, K=K, V=V, BT=BT, BK=BK, BV=BV, PRECISION=precision,
        num_warps=FWD_H_NUM_WARPS, num_stages=FWD_H_NUM_STAGES,
    )  # fmt: skip

    o = torch.empty(T, HV, V, dtype=dtype, device=dev)
    BV = min(64, next_pow2(V))
    launch(
        "fwd_o", chunk_gdn_fwd_o_kernel, (triton.cdiv(V, BV), NT, HV),
        q, k, q_rstd, k_rstd, v_new, h, gc, o, cu_seqlens, chunk_indices, scale,
        H=H, HV=HV, K=K, V=V, BT=BT, BK=min(64, BK), BV=BV, PRECISION=precision,
        num_warps=CHUNK_NUM_WARPS,
    )  # fmt: skip
    stages = dict(
        q_rstd=q_rstd, k_rstd=k_rstd, gc=gc, beta=beta_f, A=A, Ai=Ai, w=w, u=u, h=h, v_new=v_new
    )
    return o, stages, launches
