"""Gated delta rule: chunked prefill and recurrent decode over state slots."""

from qwen35_kernels.gdn.chunk import chunk_gated_delta_rule
from qwen35_kernels.gdn.fused_recurrent import fused_recurrent_gated_delta_rule
from qwen35_kernels.gdn.gating import gdn_gating

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "gdn_gating"]
