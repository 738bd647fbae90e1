"""Partial rotary position embedding (the first rotary_dim channels of each head), with YaRN
frequencies for long contexts."""

from qwen35_kernels.rope.rope import apply_rope, rope_inv_freq, rotate
from qwen35_kernels.rope.yarn import yarn_inv_freq

__all__ = ["apply_rope", "rope_inv_freq", "rotate", "yarn_inv_freq"]
