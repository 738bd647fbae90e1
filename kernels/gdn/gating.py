"""Decay and write strength of Gated DeltaNet from the projections a and b."""

import torch
import torch.nn.functional as F


def gdn_gating(
    a: torch.Tensor,  # [T, HV]
    b: torch.Tensor,  # [T, HV]
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias) (fp32, log space), beta = sigmoid(b)."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()
