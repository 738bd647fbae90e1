"""Zero-centred RMSNorm (x * (1 + w)) and the gated RMSNorm of Gated DeltaNet (x * w * silu(z)).

Rounding follows the reference model: normalise in fp32, then for the zero-centred norm scale in
fp32 before casting; for the gated norm cast first, then scale, then gate in fp32. The public
functions send CUDA tensors to the Triton kernel of rms_norm_triton.py and others to the
`_torch` paths here; a model's kernel backend (qwen35_ray.model.kernel_backend) calls one side
directly.
"""

import torch
import torch.nn.functional as F
from qwen35_kernels.utils import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from qwen35_kernels.norm.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    if use_triton(x):
        from qwen35_kernels.norm.rms_norm_triton import gated_rms_norm_triton

        return gated_rms_norm_triton(x, z, weight, eps)
    return gated_rms_norm_torch(x, z, weight, eps)


def gated_rms_norm_torch(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * xf.to(x.dtype)
    return (h * F.silu(z.float())).to(x.dtype)
