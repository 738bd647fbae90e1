"""fp32 reference attention for one sequence with contiguous K/V: causal, GQA, query offset."""

import torch


def naive_attention(
    q: torch.Tensor,  # [Lq, Hq, D] the last Lq positions of the sequence
    k: torch.Tensor,  # [L, Hkv, D] all positions
    v: torch.Tensor,  # [L, Hkv, D]
    scale: float,
) -> torch.Tensor:
    Lq, Hq, _ = q.shape
    L, Hkv, _ = k.shape
    k = k.float().repeat_interleave(Hq // Hkv, dim=1)
    v = v.float().repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(L - Lq, L, device=q.device)[:, None]
    scores = scores.masked_fill(torch.arange(L, device=q.device)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
