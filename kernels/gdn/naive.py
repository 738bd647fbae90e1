"""fp32 reference of the gated delta rule: one token at a time, straight from the recurrence.

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T
    o_t = S_t^T (q_t * scale)

S is [K, V] per value head; query/key head h serves value heads h*G .. h*G+G-1 (G = HV / H).
"""

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    g: torch.Tensor,  # [T, HV] log decay, <= 0
    beta: torch.Tensor,  # [T, HV]
    initial_state: torch.Tensor | None = None,  # [HV, K, V]
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    output_intermediate_states: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One sequence. Returns (o [T, HV, V] in v's dtype, final state [HV, K, V] fp32), and with
    output_intermediate_states also the state after every token [T, HV, K, V] fp32."""
    T, H, K = k.shape
    HV, V = v.shape[1:]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(HV // H, dim=1) * scale
    k = k.repeat_interleave(HV // H, dim=1)
    S = q.new_zeros(HV, K, V) if initial_state is None else initial_state.float().clone()
    o = v.new_empty(T, HV, V)
    states = []
    for t in range(T):
        S = S * g[t].exp()[:, None, None]
        delta = (v[t] - torch.einsum("hkv,hk->hv", S, k[t])) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        o[t] = torch.einsum("hkv,hk->hv", S, q[t])
        if output_intermediate_states:
            states.append(S)
    if output_intermediate_states:
        return o, S, torch.stack(states) if states else S.new_empty(0, HV, K, V)
    return o, S
