"""Chunked gated delta rule for prefill: varlen sequences, states read from and written to slots.

Within a chunk of C tokens the C rank-one delta updates collapse into one triangular solve
(the WY representation), so the sequential work is one small matmul step per chunk instead of
one per token. Chunks of a sequence are processed all at once except for that state carry.
"""

import torch
from qwen35_kernels.gdn.naive import l2norm


def _chunk_one_sequence(q, k, v, g, beta, state, chunk_size):
    """q, k: [L, HV, K] fp32 (normalised, q scaled); v: [L, HV, V]; g, beta: [L, HV];
    state: [HV, K, V] fp32. Returns (o [L, HV, V] fp32, final state)."""
    L, HV, K = k.shape
    C = chunk_size
    pad = (-L) % C
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    N = (L + pad) // C
    # [HV, N, C, D]: heads first so every matmul below is batched over (head, chunk)
    q, k, v = (x.view(N, C, HV, -1).permute(2, 0, 1, 3) for x in (q, k, v))
    g, beta = (x.view(N, C, HV).permute(2, 0, 1) for x in (g, beta))
    gc = g.cumsum(-1)  # [HV, N, C] log decay from chunk start to each position
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(gc_i - gc_j) for j <= i; masked before exp so it cannot overflow
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kb = k * beta[..., None]
    # (I + tril(beta_i k_i.k_j decay_ij, -1)) W = [beta v, beta k exp(gc)]
    system = torch.tril(kb @ k.transpose(-1, -2) * decay, -1) + torch.eye(C, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * gc.exp()[..., None]], dim=-1)
    w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, kdecay = w[..., : v.shape[-1]], w[..., v.shape[-1] :]
    attn = q @ k.transpose(-1, -2) * decay  # [HV, N, C, C], causal within the chunk
    q_decayed = q * gc.exp()[..., None]
    k_to_end = k * (gc[..., -1:] - gc).exp()[..., None]
    chunk_decay = gc[..., -1].exp()  # [HV, N]
    o = torch.empty_like(v)
    for n in range(N):
        v_new = u[:, n] - kdecay[:, n] @ state
        o[:, n] = q_decayed[:, n] @ state + attn[:, n] @ v_new
        state = state * chunk_decay[:, n, None, None] + k_to_end[:, n].transpose(-1, -2) @ v_new
    o = o.permute(1, 2, 0, 3).reshape(N * C, HV, -1)[:L]
    return o, state


def chunk_gated_delta_rule(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    g: torch.Tensor,  # [T, HV] log decay
    beta: torch.Tensor,  # [T, HV]
    cu_seqlens: torch.Tensor,  # [B+1]
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B] slot of each sequence
    has_initial_state: torch.Tensor,  # [B] bool: start from the slot (else from zeros)
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Returns o [T, HV, V] in v's dtype; writes each sequence's final state to its slot."""
    H, K = k.shape[1:]
    HV = v.shape[1]
    scale = K**-0.5 if scale is None else scale
    qf, kf = q.float(), k.float()
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf.repeat_interleave(HV // H, dim=1) * scale
    kf = kf.repeat_interleave(HV // H, dim=1)
    vf, gf, bf = v.float(), g.float(), beta.float()
    o = torch.empty_like(v)
    bounds = cu_seqlens.tolist()
    slots = state_indices.tolist()
    starts = has_initial_state.tolist()
    for i, slot in enumerate(slots):
        s, e = bounds[i], bounds[i + 1]
        h0 = state[slot].float() if starts[i] else state.new_zeros(state.shape[1:]).float()
        o_i, h = _chunk_one_sequence(qf[s:e], kf[s:e], vf[s:e], gf[s:e], bf[s:e], h0, chunk_size)
        o[s:e] = o_i.to(o.dtype)
        state[slot] = h.to(state.dtype)
    return o
