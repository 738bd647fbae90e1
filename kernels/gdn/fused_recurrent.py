"""Recurrent gated delta rule for decode over state slots, updated in place.

One token per sequence for plain decode ([B, H, K] inputs), or T tokens per sequence for
speculative verification ([B, T, H, K] inputs). For the latter `intermediate_states`
[B, T, HV, K, V] receives the state after every position, so the engine can restart from the
state after the last accepted token; the slot itself ends at the state after all T tokens.
"""

import torch
from qwen35_kernels.gdn.gating import gdn_gating
from qwen35_kernels.gdn.naive import l2norm
from qwen35_kernels.utils import use_triton


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,  # [B, H, K] or [B, T, H, K]
    k: torch.Tensor,  # [B, H, K] or [B, T, H, K]
    v: torch.Tensor,  # [B, HV, V] or [B, T, HV, V]
    g: torch.Tensor,  # [B, HV] or [B, T, HV] log decay
    beta: torch.Tensor,  # [B, HV] or [B, T, HV]
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B]
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    *,
    intermediate_states: torch.Tensor | None = None,  # [B, T, HV, K, V] fp32, written
) -> torch.Tensor:
    """Returns o [B, HV, V] (or [B, T, HV, V]) in v's dtype."""
    if use_triton(q):
        from qwen35_kernels.gdn.fused_recurrent_triton import (
            fused_recurrent_gated_delta_rule_triton,
        )

        return fused_recurrent_gated_delta_rule_triton(
            q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm,
            intermediate_states=intermediate_states,
        )  # fmt: skip
    one_token = q.dim() == 3
    out_dtype = v.dtype
    if one_token:
        q, k, v, g, beta = (x.unsqueeze(1) for x in (q, k, v, g, beta))
    H, K = k.shape[2:]
    HV = v.shape[2]
    scale = K**-0.5 if scale is None else scale
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(HV // H, dim=2) * scale
    k = k.repeat_interleave(HV // H, dim=2)
    decay, beta, v = g.float().exp(), beta.float(), v.float()
    S = state[state_indices].float()  # [B, HV, K, V]
    o = []
    # plain batched matmuls: at decode sizes each op's dispatch costs more than its arithmetic
    for t in range(q.shape[1]):
        kt = k[:, t, :, None, :]  # [B, HV, 1, K]
        S = S * decay[:, t, :, None, None]
        delta = (v[:, t, :, None, :] - kt @ S) * beta[:, t, :, None, None]  # [B, HV, 1, V]
        S = S + kt.transpose(-1, -2) @ delta
        o.append((q[:, t, :, None, :] @ S)[:, :, 0])
        if intermediate_states is not None:
            intermediate_states[:, t] = S.to(intermediate_states.dtype)
    state[state_indices] = S.to(state.dtype)
    o = torch.stack(o, dim=1).to(out_dtype)
    return o[:, 0] if one_token else o


def fused_recurrent_gated_delta_rule_with_gating(
    q: torch.Tensor,  # [B, H, K] or [B, T, H, K]
    k: torch.Tensor,  # [B, H, K] or [B, T, H, K]
    v: torch.Tensor,  # [B, HV, V] or [B, T, HV, V]
    a: torch.Tensor,  # [B, HV] or [B, T, HV] decay projection
    b: torch.Tensor,  # [B, HV] or [B, T, HV] write-strength projection
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B]
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    *,
    intermediate_states: torch.Tensor | None = None,  # [B, T, HV, K, V] fp32, written
) -> torch.Tensor:
    """fused_recurrent_gated_delta_rule with gdn_gating fused in."""
    if use_triton(q):
        from qwen35_kernels.gdn.fused_recurrent_triton import (
            fused_recurrent_gated_delta_rule_triton,
        )

        return fused_recurrent_gated_delta_rule_triton(
            q, k, v, None, None, state, state_indices, scale, use_qk_l2norm,
            intermediate_states=intermediate_states, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
        )  # fmt: skip
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    return fused_recurrent_gated_delta_rule(
        q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm,
        intermediate_states=intermediate_states,
    )  # fmt: skip
