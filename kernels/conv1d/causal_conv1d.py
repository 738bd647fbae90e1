"""Causal depthwise conv1d with SiLU: varlen prefill and single-step decode over state slots.

A slot holds the last W-1 inputs of its sequence ([C, W-1]), so a sequence can continue in a
later step (chunked prefill, decode) exactly as if it had been run in one piece. CUDA tensors go
to the Triton kernels of causal_conv1d_triton.py.
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
    C, W = weight.shape
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    starts = has_initial_state.tolist()
    # one F.conv1d per sequence: batching them into one call changes the rounding of the sums,
    # and the model must match the reference implementation to the last bit it can
    for i, slot in enumerate(state_indices.tolist()):
        s, e = bounds[i], bounds[i + 1]
        prev = conv_state[slot] if starts[i] else conv_state.new_zeros(C, W - 1)
        xx = torch.cat([prev.to(weight.dtype), x[s:e].T.to(weight.dtype)], dim=1)
        y = F.conv1d(xx[None], weight[:, None, :], groups=C)[0]  # [C, L]
        out[s:e] = F.silu(y).T.to(x.dtype)
        conv_state[slot] = xx[:, -(W - 1) :].to(conv_state.dtype)
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
