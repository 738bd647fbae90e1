"""fp32 references of the two RMSNorms, without the reference model's intermediate roundings."""

import torch
import torch.nn.functional as F


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: x / rms(x) * (1 + w); fp32 [..., N]."""
    x = x.float()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * (1.0 + weight.float())


def naive_gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gated RMSNorm: x / rms(x) * w * silu(z); fp32 [..., N]."""
    x = x.float()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.float() * F.silu(z.float())
