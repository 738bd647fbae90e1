"""YaRN (https://arxiv.org/abs/2309.00071): RoPE frequencies for contexts past the pretraining
length, as transformers' `_compute_yarn_parameters` computes them.

Each rotary frequency is a blend of itself (extrapolation) and itself divided by `factor`
(interpolation). Frequencies that turn more than `beta_fast` times over the pretraining length
`original_max_position_embeddings` keep their value; those that turn fewer than `beta_slow`
times are divided by `factor`; a linear ramp over the rotary dimensions joins the two. The
attention factor that YaRN also prescribes (it multiplies cos and sin) is a scalar of the
config, computed there (`qwen35_ray/model/rope_config.py`) and passed to `apply_rope`.

Legend: R = rotary dims (head_dim x partial_rotary_factor).
"""

import math

import torch


def _correction_dim(rotations: float, dim: int, theta: float, length: int) -> float:
    """The rotary dimension whose frequency turns `rotations` times over `length` positions."""
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(
    rotary_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """Inverse frequencies [R/2] in fp32; equal to transformers' bit for bit."""
    low = _correction_dim(beta_fast, rotary_dim, theta, original_max_position_embeddings)
    high = _correction_dim(beta_slow, rotary_dim, theta, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        # the ramp would divide by zero; transformers widens it the same way
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # [R/2] 1: extrapolate (keep the frequency), 0: interpolate (divide)
    pos_freqs = theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    return interpolated * (1 - keep) + extrapolated * keep
