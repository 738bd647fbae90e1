"""Causal depthwise conv1d with SiLU: varlen prefill and single-step decode over state slots.

A slot holds the last W-1 inputs of its sequence ([C, W-1]), so a sequence can continue in a
later step (chunked prefill, decode) exactly as if it had been run in one piece. The public
functions send CUDA tensors to the Triton kernels of causal_conv1d_triton.py and others to the
`_torch` paths here.
"""

import torch
import torch.nn.functional as F
from qwen35_kernels.utils import use_triton


def causal_conv1d_varlen(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, W]
    cu_seqlens: torch.Tensor,  # [B+1]
    conv_state: torch.Tensor,  # [S, C, W-1] slots, updated in place
    state_indices: torch.Tensor,  # [B]
    has_initial_state: torch.Tensor,  # [B] bool
) -> torch.Tensor:
    """Returns silu(conv(x)) [T, C] in x's dtype."""
    if use_triton(x):
        from qwen35_kernels.conv1d.causal_conv1d_triton import causal_conv1d_varlen_triton

        return causal_conv1d_varlen_triton(
            x, weight, cu_seqlens, conv_state, state_indices, has_initial_state
        )
    return causal_conv1d_varlen_torch(
        x, weight, cu_seqlens, conv_state, state_indices, has_initial_state
    )


def causal_conv1d_varlen_torch(
    x: torch.Tensor,  # [T, C]
    weight: torch.Tensor,  # [C, W]
    cu_seqlens: torch.Tensor,  # [B+1]
    conv_state: torch.Tensor,  # [S, C, W-1] slots, updated in place
    state_indices: torch.Tensor,  # [B]
    has_initial_state: torch.Tensor,  # [B] bool
) -> torch.Tensor:
    C, W = weight.shape
    T, B, P = x.shape[0], state_indices.shape[0], W - 1
    dev = x.device
    # One buffer for the whole batch: each sequence's P saved inputs, then its tokens. Token t
    # of sequence b sits at row t + (b + 1) * P, so its window starts at row t + b * P, and one
    # pass over the buffer computes every window (windows across a sequence boundary are
    # computed too and never read).
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_of = torch.repeat_interleave(torch.arange(B, device=dev), lengths, output_size=T)
    first = torch.arange(T, device=dev) + seq_of * P  # window start of each token
    starts = cu_seqlens[:-1].long() + torch.arange(B, device=dev) * P  # of each sequence
    saved = conv_state[state_indices].to(weight.dtype)
    saved = torch.where(has_initial_state.to(dev)[:, None, None], saved, 0.0)  # [B, C, P]
    buf = x.new_empty(T + B * P, C, dtype=weight.dtype)
    prev_rows = starts[:, None] + torch.arange(P, device=dev)  # [B, P]
    buf[prev_rows] = saved.transpose(1, 2)
    buf[first + P] = x.to(weight.dtype)
    # the W taps as shifted row slices of the buffer (a depthwise F.conv1d is slower here)
    n = buf.shape[0] - P
    y = buf[:n] * weight[:, 0]
    for w in range(1, W):
        y.addcmul_(buf[w : w + n], weight[:, w])
    out = F.silu(y[first]).to(x.dtype)
    # the new state: the last P rows of each sequence's part of the buffer
    conv_state[state_indices] = (
        buf[prev_rows + lengths[:, None]].transpose(1, 2).to(conv_state.dtype)
    )
    return out


def causal_conv1d_update(
    x: torch.Tensor,  # [B, C] one new token per sequence
    weight: torch.Tensor,  # [C, W]
    conv_state: torch.Tensor,  # [S, C, W-1] slots, updated in place
    state_indices: torch.Tensor,  # [B]
) -> torch.Tensor:
    """Returns silu(conv) [B, C] in x's dtype."""
    if use_triton(x):
        from qwen35_kernels.conv1d.causal_conv1d_triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, weight, conv_state, state_indices)
    return causal_conv1d_update_torch(x, weight, conv_state, state_indices)


def causal_conv1d_update_torch(
    x: torch.Tensor,  # [B, C]
    weight: torch.Tensor,  # [C, W]
    conv_state: torch.Tensor,  # [S, C, W-1] slots, updated in place
    state_indices: torch.Tensor,  # [B]
) -> torch.Tensor:
    y, conv_state[state_indices] = causal_conv1d_step(x, weight, conv_state[state_indices])
    return y


def causal_conv1d_step(
    x: torch.Tensor,  # [B, C] one new token per sequence
    weight: torch.Tensor,  # [C, W]
    state: torch.Tensor,  # [B, C, W-1] each sequence's last inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch single-token step without slots: (silu(conv) [B, C] in x's dtype, the new
    state [B, C, W-1]). Nothing is written, so a compiled decode step can use it."""
    xx = torch.cat([state, x[:, :, None].to(state.dtype)], dim=2)
    y = (xx.to(weight.dtype) * weight).sum(-1)
    return F.silu(y).to(x.dtype), xx[:, :, 1:]
