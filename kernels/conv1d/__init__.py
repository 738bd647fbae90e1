"""Depthwise causal conv1d over the q, k, v channels of Gated DeltaNet, with state slots."""

from qwen35_kernels.conv1d.causal_conv1d import (
    causal_conv1d_step,
    causal_conv1d_update,
    causal_conv1d_update_torch,
    causal_conv1d_varlen,
    causal_conv1d_varlen_torch,
)
from qwen35_kernels.conv1d.causal_conv1d_triton import (
    causal_conv1d_update_triton,
    causal_conv1d_varlen_triton,
)

__all__ = [
    "causal_conv1d_step",
    "causal_conv1d_update",
    "causal_conv1d_update_torch",
    "causal_conv1d_update_triton",
    "causal_conv1d_varlen",
    "causal_conv1d_varlen_torch",
    "causal_conv1d_varlen_triton",
]
