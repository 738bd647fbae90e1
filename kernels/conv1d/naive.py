"""fp32 reference of the causal conv1d with carried state: one sequence, explicit sum."""

import torch
import torch.nn.functional as F


def naive_causal_conv1d(
    x: torch.Tensor,  # [L, C]
    weight: torch.Tensor,  # [C, W]
    initial_state: torch.Tensor | None = None,  # [C, W-1]: the W-1 inputs before x
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (silu(conv) [L, C] fp32, final state [C, W-1])."""
    C, W = weight.shape
    prev = x.new_zeros(C, W - 1) if initial_state is None else initial_state
    xx = torch.cat([prev.float(), x.float().T], dim=1)  # [C, W-1+L]
    L = x.shape[0]
    y = xx.new_empty(L, C)
    for t in range(L):
        y[t] = (xx[:, t : t + W] * weight.float()).sum(-1)
    return F.silu(y), xx[:, L:]
