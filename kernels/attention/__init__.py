"""Attention over a paged KV cache: cache writes, prefill and decode with GQA."""

from qwen35_kernels.attention.paged import paged_attention, paged_attention_torch, write_kv
from qwen35_kernels.attention.paged_triton import paged_attention_triton

__all__ = ["paged_attention", "paged_attention_torch", "paged_attention_triton", "write_kv"]
