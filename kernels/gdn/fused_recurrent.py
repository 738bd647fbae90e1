"""Recurrent gated delta rule for decode: one token per sequence, state slots updated in place."""

import torch
from qwen35_kernels.gdn.naive import l2norm


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,  # [B, H, K]
    k: torch.Tensor,  # [B, H, K]
    v: torch.Tensor,  # [B, HV, V]
    g: torch.Tensor,  # [B, HV] log decay
    beta: torch.Tensor,  # [B, HV]
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B]
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """Returns o [B, HV, V] in v's dtype."""
    H, K = k.shape[1:]
    HV = v.shape[1]
    scale = K**-0.5 if scale is None else scale
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(HV // H, dim=1) * scale
    k = k.repeat_interleave(HV // H, dim=1)
    S = state[state_indices].float() * g.float().exp()[..., None, None]  # [B, HV, K, V]
    delta = (v.float() - torch.einsum("bhkv,bhk->bhv", S, k)) * beta.float()[..., None]
    S = S + k[..., :, None] * delta[..., None, :]
    state[state_indices] = S.to(state.dtype)
    return torch.einsum("bhkv,bhk->bhv", S, q).to(v.dtype)
