"""Norm modules holding their weights; the math lives in qwen35_kernels.norm."""

import torch
from qwen35_kernels.norm import gated_rms_norm, rms_norm
from torch import nn


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the weight starts at 0 and the scale is (1 + weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Per-head norm of the GDN output, scaled by weight (not 1 + weight) and gated by silu(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)
