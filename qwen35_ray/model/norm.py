"""Norm modules holding their weights; the math is the model's kernel backend's."""

import torch
from torch import nn

from qwen35_ray.model.kernel_backend import TORCH, KernelBackend


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the weight starts at 0 and the scale is (1 + weight)."""

    def __init__(self, dim: int, eps: float, kernels: KernelBackend = TORCH):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Per-head norm of the GDN output, scaled by weight (not 1 + weight) and gated by silu(z)."""

    def __init__(self, dim: int, eps: float, kernels: KernelBackend = TORCH):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.kernels.gated_rms_norm(x, z, self.weight, self.eps)
