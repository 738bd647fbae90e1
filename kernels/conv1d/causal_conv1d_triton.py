"""Triton causal depthwise conv1d with SiLU over state slots: varlen prefill and decode update.

Prefill tiles every sequence into blocks of BT tokens by BC channels; a token's window reaches
back into the slot's saved inputs when it starts within W-1 tokens of its sequence start. The
slots are rewritten by a second launch, so no tile can read a slot another tile has already
overwritten.
"""

import torch
import triton
import triton.language as tl
from qwen35_kernels.utils import prepare_chunk_indices


@triton.jit
def causal_conv1d_varlen_fwd_kernel(
    x, weight, out, conv_state, state_indices, has_initial_state, cu_seqlens, chunk_indices,
    C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    i_c, i_t = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_b = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    slot = tl.load(state_indices + i_n).to(tl.int64)
    # how far back the slot's saved inputs reach: W-1 inputs, or none for a fresh sequence
    n_saved = tl.load(has_initial_state + i_n) * (W - 1)
    o_i = i_b * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_tc = (o_i < eos - bos)[:, None] & (o_c < C)[None, :]

    b_acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        # input j of the window of position i sits at position p = i - (W-1) + j of the sequence
        p = o_i - (W - 1) + j
        p_x = x + (bos + p)[:, None] * C + o_c[None, :]
        b_x = tl.load(p_x, mask=m_tc & (p >= 0)[:, None], other=0).to(tl.float32)
        p_s = conv_state + (slot * C + o_c[None, :]) * (W - 1) + (W - 1 + p)[:, None]
        m_s = m_tc & ((p < 0) & (p >= -n_saved))[:, None]
        b_x += tl.load(p_s, mask=m_s, other=0).to(tl.float32)
        b_w = tl.load(weight + o_c * W + j, mask=o_c < C, other=0).to(tl.float32)
        b_acc += b_x * b_w[None, :]
    b_y = b_acc * tl.sigmoid(b_acc)
    p_o = out + (bos + o_i)[:, None] * C + o_c[None, :]
    tl.store(p_o, b_y.to(out.dtype.element_ty), mask=m_tc)


@triton.jit
def causal_conv1d_state_fwd_kernel(
    x, conv_state, state_indices, has_initial_state, cu_seqlens,
    C: tl.constexpr, W: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    i_c, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    L = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    slot = tl.load(state_indices + i_n).to(tl.int64)
    n_saved = tl.load(has_initial_state + i_n) * (W - 1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_row = conv_state + (slot * C + o_c) * (W - 1)
    # column j of the new state is input L - (W-1) + j; when that is before the sequence start it
    # is old column j + L > j, which no earlier iteration has overwritten
    for j in tl.static_range(W - 1):
        # a vector, not a scalar: the interpreter mangles masks mixing the two
        p = tl.zeros([BC], dtype=tl.int64) + L - (W - 1) + j
        b_x = tl.load(x + (bos + p) * C + o_c, mask=m_c & (p >= 0), other=0).to(tl.float32)
        m_s = m_c & (p < 0) & (p >= -n_saved)
        b_x += tl.load(p_row + j + L, mask=m_s, other=0).to(tl.float32)
        tl.store(p_row + j, b_x.to(conv_state.dtype.element_ty), mask=m_c)


@triton.jit
def causal_conv1d_update_fwd_kernel(
    x, weight, out, conv_state, state_indices,
    C: tl.constexpr, W: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    i_c, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    slot = tl.load(state_indices + i_n).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_row = conv_state + (slot * C + o_c) * (W - 1)
    b_acc = tl.zeros([BC], dtype=tl.float32)
    # shift the window left by one as it is read: column j moves to j - 1
    for j in tl.static_range(W - 1):
        b_s = tl.load(p_row + j, mask=m_c, other=0)
        b_w = tl.load(weight + o_c * W + j, mask=m_c, other=0)
        b_acc += b_s.to(tl.float32) * b_w.to(tl.float32)
        if j > 0:
            tl.store(p_row + j - 1, b_s, mask=m_c)
    b_x = tl.load(x + i_n * C + o_c, mask=m_c, other=0)
    b_w = tl.load(weight + o_c * W + W - 1, mask=m_c, other=0)
    b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)
    tl.store(p_row + W - 2, b_x.to(conv_state.dtype.element_ty), mask=m_c)
    b_y = b_acc * tl.sigmoid(b_acc)
    tl.store(out + i_n * C + o_c, b_y.to(out.dtype.element_ty), mask=m_c)


def causal_conv1d_varlen_triton(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, W]
    cu_seqlens: torch.Tensor,  # [B+1]
    conv_state: torch.Tensor,  # [S, C, W-1] slots, updated in place
    state_indices: torch.Tensor,  # [B]
    has_initial_state: torch.Tensor,  # [B] bool
    block_t: int = 64,
    block_c: int = 128,
) -> torch.Tensor:
    """Returns silu(conv(x)) [T, C] in x's dtype."""
    C, W = weight.shape
    B = cu_seqlens.shape[0] - 1
    x, weight = x.contiguous(), weight.contiguous()
    assert conv_state.is_contiguous(), "conv_state slots must be contiguous [S, C, W-1]"
    out = torch.empty_like(x)
    has_init = has_initial_state.to(torch.int32)
    chunk_indices = prepare_chunk_indices(cu_seqlens, block_t)
    grid = (triton.cdiv(C, block_c), chunk_indices.shape[0])
    causal_conv1d_varlen_fwd_kernel[grid](
        x, weight, out, conv_state, state_indices, has_init, cu_seqlens, chunk_indices,
        C=C, W=W, BT=block_t, BC=block_c,
    )  # fmt: skip
    causal_conv1d_state_fwd_kernel[(triton.cdiv(C, block_c), B)](
        x, conv_state, state_indices, has_init, cu_seqlens, C=C, W=W, BC=block_c
    )
    return out


def causal_conv1d_update_triton(
    x: torch.Tensor,  # [B, C] one new token per sequence
    weight: torch.Tensor,  # [C, W]
    conv_state: torch.Tensor,  # [S, C, W-1] slots, updated in place
    state_indices: torch.Tensor,  # [B]
    block_c: int = 256,
) -> torch.Tensor:
    """Returns silu(conv) [B, C] in x's dtype."""
    B, C = x.shape
    W = weight.shape[1]
    assert conv_state.is_contiguous(), "conv_state slots must be contiguous [S, C, W-1]"
    out = torch.empty_like(x)
    causal_conv1d_update_fwd_kernel[(triton.cdiv(C, block_c), B)](
        x.contiguous(), weight.contiguous(), out, conv_state, state_indices,
        C=C, W=W, BC=block_c,
    )  # fmt: skip
    return out
