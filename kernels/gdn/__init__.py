"""Gated delta rule: chunked prefill and recurrent decode over state slots.

The public functions run the Triton kernels on CUDA tensors and the PyTorch paths on CPU; the
`_torch` and `_triton` entry points run one side whatever the device (a model's kernel backend
picks them; the Triton side runs on CPU under TRITON_INTERPRET=1).
"""

from qwen35_kernels.gdn.chunk import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_torch,
    chunk_gated_delta_rule_with_gating,
    chunk_gated_delta_rule_with_gating_torch,
    chunk_gated_delta_rule_with_gating_triton,
)
from qwen35_kernels.gdn.chunk_triton import chunk_gated_delta_rule_triton
from qwen35_kernels.gdn.fused_recurrent import (
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_torch,
    fused_recurrent_gated_delta_rule_with_gating,
    fused_recurrent_gated_delta_rule_with_gating_torch,
    fused_recurrent_gated_delta_rule_with_gating_triton,
    gated_delta_step,
    prepare_qk,
)
from qwen35_kernels.gdn.fused_recurrent_triton import fused_recurrent_gated_delta_rule_triton
from qwen35_kernels.gdn.gating import gdn_gating

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "chunk_gated_delta_rule_triton",
    "chunk_gated_delta_rule_with_gating",
    "chunk_gated_delta_rule_with_gating_torch",
    "chunk_gated_delta_rule_with_gating_triton",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_torch",
    "fused_recurrent_gated_delta_rule_triton",
    "fused_recurrent_gated_delta_rule_with_gating",
    "fused_recurrent_gated_delta_rule_with_gating_torch",
    "fused_recurrent_gated_delta_rule_with_gating_triton",
    "gated_delta_step",
    "gdn_gating",
    "prepare_qk",
]
