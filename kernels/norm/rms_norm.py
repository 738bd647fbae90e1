"""Zero-centred RMSNorm (x * (1 + w)) and the gated RMSNorm of Gated DeltaNet (x * w * silu(z)).

Rounding follows the reference model: normalise in fp32, then for the zero-centred norm scale in
fp32 before casting; for the gated norm cast first, then scale, then gate in fp32. CUDA tensors
go to the Triton kernel of rms_norm_triton.py.
"""

import torch
import torch.nn.functional as F
from qwen35_kernels.utils import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from qwen35_kernels.norm.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    if use_triton(x):
        from qwen35_kernels.norm.rms_norm_triton import gated_rms_norm_triton

        return gated_rms_norm_triton(x, z, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * xf.to(x.dtype)
    return (h * F.silu(z.float())).to(x.dtype)
