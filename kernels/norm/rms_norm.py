"""Zero-centred RMSNorm (x * (1 + w)) and the gated RMSNorm of Gated DeltaNet (x * w * silu(z)).

Rounding follows the reference model: normalise in fp32, then for the zero-centred norm scale in
fp32 before casting; for the gated norm cast first, then scale, then gate in fp32.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * xf.to(x.dtype)
    return (h * F.silu(z.float())).to(x.dtype)
