"""RMSNorm variants of Qwen3.5."""

from qwen35_kernels.norm.rms_norm import gated_rms_norm, rms_norm

__all__ = ["gated_rms_norm", "rms_norm"]
