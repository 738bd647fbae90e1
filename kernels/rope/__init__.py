"""Partial rotary position embedding (the first rotary_dim channels of each head)."""

from qwen35_kernels.rope.rope import apply_rope, rope_inv_freq

__all__ = ["apply_rope", "rope_inv_freq"]
