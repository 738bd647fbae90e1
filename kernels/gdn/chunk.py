"""Chunked gated delta rule for prefill: varlen sequences, states read from and written to slots.

Within a chunk of C tokens the C rank-one delta updates collapse into one triangular solve
(the WY representation), so the sequential work is one small matmul step per chunk instead of
one per token. The PyTorch path below runs the in-chunk algebra for every chunk of the batch at
once and then carries the states chunk by chunk, all sequences together; CUDA tensors go to the
Triton kernels of chunk_triton.py.
"""

import torch
from qwen35_kernels.gdn.gating import gdn_gating
from qwen35_kernels.gdn.naive import l2norm
from qwen35_kernels.utils import use_triton


def _chunk_layout(cu_seqlens: torch.Tensor, C: int):
    """Token index [NT, C] of every chunk position (T for padding), chunks ordered step-major
    (every sequence's first chunk, then every second chunk, ...), and per step the slice of its
    chunks and the sequences that have one."""
    bounds = cu_seqlens.tolist()
    T = bounds[-1]
    n_chunks = [(e - s + C - 1) // C for s, e in zip(bounds[:-1], bounds[1:])]
    starts, ends, steps = [], [], []
    for n in range(max(n_chunks, default=0)):
        seqs = [b for b, m in enumerate(n_chunks) if m > n]
        steps.append((slice(len(starts), len(starts) + len(seqs)), seqs))
        starts += [bounds[b] + n * C for b in seqs]
        ends += [bounds[b + 1] for b in seqs]
    dev = cu_seqlens.device
    tok = torch.tensor(starts, dtype=torch.long, device=dev)[:, None] + torch.arange(C, device=dev)
    tok = torch.where(tok < torch.tensor(ends, device=dev)[:, None], tok, T)
    return tok.reshape(-1, C), steps


def _chunk_torch(q, k, v, g, beta, cu_seqlens, h0, chunk_size):
    """q, k: [T, HV, K] fp32 (normalised, q scaled); v: [T, HV, V]; g, beta: [T, HV];
    h0: [B, HV, K, V] fp32. Returns (o [T, HV, V] fp32, final states [B, HV, K, V])."""
    T, HV, K = k.shape
    C = chunk_size
    tok, steps = _chunk_layout(cu_seqlens, C)
    # one zero row at index T stands for the padding: beta = 0 and g = 0 make it a no-op
    q, k, v, g, beta = (torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in (q, k, v, g, beta))
    # [NT, HV, C, D]: every matmul below is batched over (chunk, head)
    q, k, v = (x[tok].transpose(1, 2).contiguous() for x in (q, k, v))
    g, beta = (x[tok].transpose(1, 2) for x in (g, beta))
    gc = g.cumsum(-1)  # [NT, HV, C] log decay from chunk start to each position
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(gc_i - gc_j) for j <= i; masked before exp so it cannot overflow
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kb = k * beta[..., None]
    # one matmul gives both beta_i k_i.k_j and q_i.k_j
    scores = torch.cat([kb, q], dim=-2) @ k.transpose(-1, -2)
    # (I + tril(beta_i k_i.k_j decay_ij, -1)) W = [beta v, beta k exp(gc)]
    system = torch.tril(scores[..., :C, :] * decay, -1) + torch.eye(C, device=q.device)
    rhs = torch.cat([v * beta[..., None], kb * gc.exp()[..., None]], dim=-1)
    w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    Vd = v.shape[-1]
    attn = scores[..., C:, :] * decay  # causal within the chunk
    k_to_end = (k * (gc[..., -1:] - gc).exp()[..., None]).transpose(-1, -2)  # [NT, HV, K, C]
    # With v_new = u - kdecay S (w = [u, kdecay]), the chunk's output and next state are affine
    # in its start state S: o = attn u + (q exp(gc) - attn kdecay) S and S' = A S + k_to_end u
    # with A = exp(gc_last) I - k_to_end kdecay. All but the chain S -> S' is batched here.
    attn_w, end_w = attn @ w, k_to_end @ w
    o = attn_w[..., :Vd]
    q_eff = q * gc.exp()[..., None] - attn_w[..., Vd:]
    A = torch.eye(K, device=q.device) * gc[..., -1].exp()[..., None, None] - end_w[..., Vd:]
    Bu = end_w[..., :Vd].contiguous()
    starts = torch.empty_like(Bu)  # [NT, HV, K, V] state at each chunk's start
    state = h0.clone()
    B = h0.shape[0]
    for c, seqs in steps:
        # while every sequence still has chunks left, skip the gather and scatter
        full = len(seqs) == B
        S = state if full else state[seqs]
        starts[c] = S
        S = torch.baddbmm(Bu[c].flatten(0, 1), A[c].flatten(0, 1), S.flatten(0, 1))
        if full:
            state = S.view_as(state)
        else:
            state[seqs] = S.view(len(seqs), *state.shape[1:])
    o = o + q_eff @ starts
    valid = tok < T
    out = o.new_empty(T, HV, v.shape[-1])
    out[tok[valid]] = o.transpose(1, 2)[valid]
    return out, state


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
    if use_triton(q):
        from qwen35_kernels.gdn.chunk_triton import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(
            q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state,
            scale, use_qk_l2norm, chunk_size,
        )  # fmt: skip
    H, K = k.shape[1:]
    HV = v.shape[1]
    scale = K**-0.5 if scale is None else scale
    qf, kf = q.float(), k.float()
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf.repeat_interleave(HV // H, dim=1) * scale
    kf = kf.repeat_interleave(HV // H, dim=1)
    h0 = state[state_indices].float()
    h0 = torch.where(has_initial_state.to(h0.device)[:, None, None, None], h0, 0.0)
    o, h = _chunk_torch(qf, kf, v.float(), g.float(), beta.float(), cu_seqlens, h0, chunk_size)
    state[state_indices] = h.to(state.dtype)
    return o.to(v.dtype)


def chunk_gated_delta_rule_with_gating(
    q: torch.Tensor,  # [T, H, K]
    k: torch.Tensor,  # [T, H, K]
    v: torch.Tensor,  # [T, HV, V]
    a: torch.Tensor,  # [T, HV] decay projection
    b: torch.Tensor,  # [T, HV] write-strength projection
    A_log: torch.Tensor,  # [HV]
    dt_bias: torch.Tensor,  # [HV]
    cu_seqlens: torch.Tensor,  # [B+1]
    state: torch.Tensor,  # [S, HV, K, V] fp32 state slots, updated in place
    state_indices: torch.Tensor,  # [B]
    has_initial_state: torch.Tensor,  # [B] bool
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> torch.Tensor:
    """chunk_gated_delta_rule with gdn_gating fused in: g and beta never reach memory on GPU."""
    if use_triton(q):
        from qwen35_kernels.gdn.chunk_triton import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(
            q, k, v, None, None, cu_seqlens, state, state_indices, has_initial_state,
            scale, use_qk_l2norm, chunk_size, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
        )  # fmt: skip
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    return chunk_gated_delta_rule(
        q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state,
        scale, use_qk_l2norm, chunk_size,
    )  # fmt: skip
