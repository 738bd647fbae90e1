"""Sparse MoE: softmax top-k routing and the grouped expert MLP."""

from qwen35_kernels.moe.fused_moe import fused_moe
from qwen35_kernels.moe.routing import topk_softmax

__all__ = ["fused_moe", "topk_softmax"]
