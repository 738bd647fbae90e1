"""RoPE on the first `rotary_dim` channels of each head, halves rotated (GPT-NeoX layout).

Qwen3.5 declares multimodal RoPE (`mrope_section`), but for text the temporal, height and width
positions are all the token position, so every section rotates by the same angle and M-RoPE
reduces to this plain partial RoPE. That holds for any inverse frequencies, YaRN's included
(`yarn.py`).
"""

import torch


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


def apply_rope(
    x: torch.Tensor,  # [T, H, D]
    positions: torch.Tensor,  # [T]
    inv_freq: torch.Tensor,  # [R/2]
    scale: float = 1.0,
) -> torch.Tensor:
    """`scale` multiplies cos and sin (YaRN's attention factor; 1.0 for plain RoPE), in fp32
    before the cast to x's dtype, as transformers does."""
    freqs = positions.float()[:, None] * inv_freq.to(x.device)[None, :]  # [T, R/2]
    return rotate(x, freqs, scale)


def rotate(
    x: torch.Tensor,  # [T, H, D]
    freqs: torch.Tensor,  # [T, R/2] fp32 angle of each token's frequencies
    scale: float = 1.0,
) -> torch.Tensor:
    """The rotation of the first R channels of each head by the angles (halves rotated), the
    rest passed through; what apply_rope and M-RoPE (each frequency's angle from its own
    position axis) share."""
    R = freqs.shape[1] * 2
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    cos, sin = (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)
    x_rot, x_pass = x[..., :R], x[..., R:]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
