"""Attention over a paged KV cache: cache writes, prefill and decode with GQA."""

from qwen35_kernels.attention.paged import paged_attention, write_kv

__all__ = ["paged_attention", "write_kv"]
