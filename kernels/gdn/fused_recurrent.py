"""Recurrent gated delta rule for decode over state slots, updated in place.

One token per sequence for plain decode ([B, H, K] inputs), or T tokens per sequence for
speculative verification ([B, T, H, K] inputs). For the latter `intermediate_states`
[B, T, HV, K, V] receives the state after every position, so the engine can restart from the
state after the last accepted token; the slot itself ends at the state after all T tokens.

The public functions send CUDA tensors to the Triton kernel of fused_recurrent_triton.py and
others to the `_torch` paths here; the `_with_gating` pair takes the projections a and b and
computes the decay and write strength (gdn_gating) inside, fused into the kernel on Triton.
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
    return fused_recurrent_gated_delta_rule_torch(
        q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm,
        intermediate_states=intermediate_states,
    )  # fmt: skip


def fused_recurrent_gated_delta_rule_torch(
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
    one_token = q.dim() == 3
    out_dtype = v.dtype
    if one_token:
        q, k, v, g, beta = (x.unsqueeze(1) for x in (q, k, v, g, beta))
    q, k = prepare_qk(q, k, v.shape[2], scale, use_qk_l2norm)
    decay, beta, v = g.float().exp(), beta.float(), v.float()
    S = state[state_indices].float()  # [B, HV, K, V]
    o = []
    for t in range(q.shape[1]):
        ot, S = gated_delta_step(q[:, t], k[:, t], v[:, t], decay[:, t], beta[:, t], S)
        o.append(ot)
        if intermediate_states is not None:
            intermediate_states[:, t] = S.to(intermediate_states.dtype)
    state[state_indices] = S.to(state.dtype)
    o = torch.stack(o, dim=1).to(out_dtype)
    return o[:, 0] if one_token else o


def prepare_qk(
    q: torch.Tensor,  # [..., H, K]
    k: torch.Tensor,  # [..., H, K]
    num_v_heads: int,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the recurrence takes them: fp32, L2-normalised, each key head repeated for
    its value heads ([..., HV, K]), q scaled."""
    H, K = k.shape[-2:]
    scale = K**-0.5 if scale is None else scale
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(num_v_heads // H, dim=-2) * scale
    return q, k.repeat_interleave(num_v_heads // H, dim=-2)


def gated_delta_step(
    q: torch.Tensor,  # [B, HV, K] fp32, from prepare_qk
    k: torch.Tensor,  # [B, HV, K] fp32, from prepare_qk
    v: torch.Tensor,  # [B, HV, V] fp32
    decay: torch.Tensor,  # [B, HV] exp(g)
    beta: torch.Tensor,  # [B, HV]
    S: torch.Tensor,  # [B, HV, K, V] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence for a batch, without slots: (o [B, HV, V], S'). Plain
    batched matmuls: at decode sizes each op's dispatch costs more than its arithmetic."""
    kt = k[:, :, None, :]  # [B, HV, 1, K]
    S = S * decay[:, :, None, None]
    delta = (v[:, :, None, :] - kt @ S) * beta[:, :, None, None]  # [B, HV, 1, V]
    S = S + kt.transpose(-1, -2) @ delta
    return (q[:, :, None, :] @ S)[:, :, 0], S


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
    impl = (
        fused_recurrent_gated_delta_rule_with_gating_triton
        if use_triton(q)
        else fused_recurrent_gated_delta_rule_with_gating_torch
    )
    return impl(
        q, k, v, a, b, A_log, dt_bias, state, state_indices, scale, use_qk_l2norm,
        intermediate_states=intermediate_states,
    )  # fmt: skip


def fused_recurrent_gated_delta_rule_with_gating_torch(
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
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    return fused_recurrent_gated_delta_rule_torch(
        q, k, v, g, beta, state, state_indices, scale, use_qk_l2norm,
        intermediate_states=intermediate_states,
    )  # fmt: skip


def fused_recurrent_gated_delta_rule_with_gating_triton(
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
    from qwen35_kernels.gdn.fused_recurrent_triton import fused_recurrent_gated_delta_rule_triton

    return fused_recurrent_gated_delta_rule_triton(
        q, k, v, None, None, state, state_indices, scale, use_qk_l2norm,
        intermediate_states=intermediate_states, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
    )  # fmt: skip
