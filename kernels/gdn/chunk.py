"""Chunked gated delta rule for prefill: varlen sequences, states read from and written to slots.

Within a chunk of C tokens the C rank-one delta updates collapse into one triangular solve
(the WY representation), so the sequential work is one small matmul step per chunk instead of
one per token. The PyTorch path below runs the in-chunk algebra for every chunk of the batch at
once and then carries the states chunk by chunk, all sequences together; the q.k and k.k
products are formed once per key head for the value heads it serves. The public functions send
CUDA tensors to the Triton kernels of chunk_triton.py and others to the `_torch` paths here.
"""

import torch
from qwen35_kernels.gdn.gating import gdn_gating
from qwen35_kernels.gdn.naive import l2norm
from qwen35_kernels.utils import use_triton

# The PyTorch path's elementwise work per token grows with the chunk and its sequential steps
# shrink with it. On a 2-core CPU with head dims of 32, 32 beat 64 at every size measured and
# 16 at 2048-token batches; 16 won on short prompts alone, 240 tokens or less
# (docs/bench/offline.md)
CPU_CHUNK_SIZE = 32


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
    """q, k: [T, H, K] fp32 (normalised, q scaled); v: [T, HV, V]; g, beta: [T, HV];
    h0: [B, HV, K, V] fp32. Returns (o [T, HV, V] fp32, final states [B, HV, K, V])."""
    T, H, K = k.shape
    HV, Vd = v.shape[1:]
    G, C = HV // H, chunk_size
    tok, steps = _chunk_layout(cu_seqlens, C)
    NT = tok.shape[0]
    # Padding positions (index T) read token T-1 instead: with beta = 0 and g = 0 they write
    # nothing and decay nothing, and they come after every real position of their chunk, so
    # no real position reads them; their own outputs are dropped.
    valid = tok < T
    src = tok.clamp(max=T - 1)
    # [NT, H, C, K] per key head, [NT, HV, C, *] per value head; a key head's products serve
    # its G value heads through a [NT, H, G, ...] view
    q, k = (x[src].transpose(1, 2).contiguous() for x in (q, k))
    v = v[src].transpose(1, 2)
    g, beta = (
        torch.where(valid[..., None], x[src], 0.0).transpose(1, 2).contiguous() for x in (g, beta)
    )
    gc = g.cumsum(-1).view(NT, H, G, C)  # log decay from the chunk start to each position
    beta = beta.reshape(NT, H, G, C)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(gc_i - gc_j) for j <= i, else 0; masked before exp so it cannot overflow
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kk, qk = k @ k.transpose(-1, -2), q @ k.transpose(-1, -2)  # [NT, H, C, C]
    # (I + tril(beta_i k_i.k_j decay_ij, -1)) W = [beta v, beta k exp(gc)]; the solve reads
    # the strictly lower triangle only (unitriangular), so the diagonal needs no masking
    system = (kk[:, :, None] * decay * beta[..., None]).view(NT, HV, C, C)
    kdecay = (k[:, :, None] * (beta * gc.exp())[..., None]).view(NT, HV, C, K)
    rhs = torch.cat([v * beta.view(NT, HV, C, 1), kdecay], dim=-1)
    w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    attn = (qk[:, :, None] * decay).view(NT, HV, C, C)  # causal within the chunk
    gc_last = gc[..., -1:]
    k_to_end = (k[:, :, None] * (gc_last - gc).exp()[..., None]).view(NT, HV, C, K)
    # With v_new = u - kdecay S (w = [u, kdecay]), the chunk's output and next state are affine
    # in its start state S: o = attn u + (q exp(gc) - attn kdecay) S and S' = A S + k_to_end u
    # with A = exp(gc_last) I - k_to_end kdecay. All but the chain S -> S' is batched here.
    attn_w, end_w = attn @ w, k_to_end.transpose(-1, -2) @ w
    o = attn_w[..., :Vd]
    q_eff = (q[:, :, None] * gc.exp()[..., None]).view(NT, HV, C, K) - attn_w[..., Vd:]
    A = torch.eye(K, device=q.device) * gc_last.exp().view(NT, HV, 1, 1) - end_w[..., Vd:]
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
    o = torch.baddbmm(o.flatten(0, 1), q_eff.flatten(0, 1), starts.flatten(0, 1))
    out = o.new_empty(T, HV, Vd)
    out[tok[valid]] = o.view(NT, HV, C, Vd).transpose(1, 2)[valid]
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Returns o [T, HV, V] in v's dtype; writes each sequence's final state to its slot.
    chunk_size defaults to 64 on CUDA and CPU_CHUNK_SIZE on CPU."""
    if use_triton(q):
        from qwen35_kernels.gdn.chunk_triton import chunk_gated_delta_rule_triton

        return chunk_gated_delta_rule_triton(
            q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state,
            scale, use_qk_l2norm, chunk_size or 64,
        )  # fmt: skip
    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state,
        scale, use_qk_l2norm, chunk_size,
    )  # fmt: skip


def chunk_gated_delta_rule_torch(
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    chunk_size = chunk_size or CPU_CHUNK_SIZE
    K = k.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qf, kf = q.float(), k.float()
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    h0 = state[state_indices].float()
    h0 = torch.where(has_initial_state.to(h0.device)[:, None, None, None], h0, 0.0)
    o, h = _chunk_torch(
        qf * scale, kf, v.float(), g.float(), beta.float(), cu_seqlens, h0, chunk_size
    )
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """chunk_gated_delta_rule with gdn_gating fused in: g and beta never reach memory on GPU."""
    impl = (
        chunk_gated_delta_rule_with_gating_triton
        if use_triton(q)
        else chunk_gated_delta_rule_with_gating_torch
    )
    return impl(
        q, k, v, a, b, A_log, dt_bias, cu_seqlens, state, state_indices, has_initial_state,
        scale, use_qk_l2norm, chunk_size,
    )  # fmt: skip


def chunk_gated_delta_rule_with_gating_torch(
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    return chunk_gated_delta_rule_torch(
        q, k, v, g, beta, cu_seqlens, state, state_indices, has_initial_state,
        scale, use_qk_l2norm, chunk_size,
    )  # fmt: skip


def chunk_gated_delta_rule_with_gating_triton(
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    from qwen35_kernels.gdn.chunk_triton import chunk_gated_delta_rule_triton

    return chunk_gated_delta_rule_triton(
        q, k, v, None, None, cu_seqlens, state, state_indices, has_initial_state,
        scale, use_qk_l2norm, chunk_size or 64, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
    )  # fmt: skip
