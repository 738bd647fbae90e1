"""Sparse MoE: softmax top-k routing and the grouped expert MLP."""

from qwen35_kernels.moe.align import moe_align_block_size
from qwen35_kernels.moe.fused_moe import fused_moe, fused_moe_torch, gathers_experts
from qwen35_kernels.moe.fused_moe_triton import fused_moe_triton, topk_softmax_triton
from qwen35_kernels.moe.routing import topk_softmax, topk_softmax_torch

__all__ = [
    "fused_moe",
    "fused_moe_torch",
    "fused_moe_triton",
    "gathers_experts",
    "moe_align_block_size",
    "topk_softmax",
    "topk_softmax_torch",
    "topk_softmax_triton",
]
