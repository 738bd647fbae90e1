"""RMSNorm variants of Qwen3.5."""

from qwen35_kernels.norm.rms_norm import (
    gated_rms_norm,
    gated_rms_norm_torch,
    rms_norm,
    rms_norm_torch,
)
from qwen35_kernels.norm.rms_norm_triton import gated_rms_norm_triton, rms_norm_triton

__all__ = [
    "gated_rms_norm",
    "gated_rms_norm_torch",
    "gated_rms_norm_triton",
    "rms_norm",
    "rms_norm_torch",
    "rms_norm_triton",
]
