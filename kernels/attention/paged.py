"""Attention over a paged KV cache.

The cache of one layer is [N, P, Hkv, D] (N blocks of P tokens); sequence b owns the blocks
listed in block_tables[b], and its token at position p lives in block block_tables[b][p // P]
at offset p % P. A token's flat slot is block * P + offset (slot_mapping). paged_attention
sends CUDA tensors to the Triton kernels of paged_triton.py and others to
paged_attention_torch.
"""

import torch
import torch.nn.functional as F
from qwen35_kernels.utils import use_triton


def write_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, P, Hkv, D]
    v_cache: torch.Tensor,  # [N, P, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    P = cache.shape[1]
    blocks = block_table[: (length + P - 1) // P]
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, P, Hkv, D]
    v_cache: torch.Tensor,  # [N, P, Hkv, D]
    block_tables: torch.Tensor,  # [B, M]
    cu_seqlens_q: torch.Tensor,  # [B+1] new tokens per sequence
    seq_lens: torch.Tensor,  # [B] tokens in the cache per sequence, the new ones included
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over all of its cached tokens; [T, Hq, D]."""
    if use_triton(q):
        from qwen35_kernels.attention.paged_triton import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_q_len
        )
    return paged_attention_torch(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_q_len
    )


def paged_attention_torch(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, P, Hkv, D]
    v_cache: torch.Tensor,  # [N, P, Hkv, D]
    block_tables: torch.Tensor,  # [B, M]
    cu_seqlens_q: torch.Tensor,  # [B+1]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """paged_attention in PyTorch: SDPA per sequence, or one masked matmul for decodes."""
    B = seq_lens.shape[0]
    if max_q_len == 1:
        return _decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(B):
        s, e, L = bounds[b], bounds[b + 1], lens[b]
        # [1, H, L, D] contiguous: the layout SDPA's fused CPU kernels take
        k = _gather(k_cache, block_tables[b], L).to(q.dtype).transpose(0, 1).contiguous()[None]
        v = _gather(v_cache, block_tables[b], L).to(q.dtype).transpose(0, 1).contiguous()[None]
        qb = q[s:e].transpose(0, 1).contiguous()[None]  # [1, Hq, Lq, D]
        Lq = e - s
        if Lq == L:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale,
                                               enable_gqa=True)  # fmt: skip
        else:
            # query i sits at position L - Lq + i and sees keys 0 .. L - Lq + i
            mask = torch.ones(Lq, L, dtype=torch.bool, device=q.device).tril(L - Lq)
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=True)  # fmt: skip
        out[s:e] = o[0].transpose(0, 1)
    return out


def _decode(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """One query token per sequence: gather every sequence's blocks at once, mask the tail. The
    G = Hq / Hkv query heads of a group share one matmul with their K/V head."""
    B, Hq, D = q.shape
    P, Hkv = k_cache.shape[1], k_cache.shape[2]
    M = (int(seq_lens.max()) + P - 1) // P
    tables = block_tables[:, :M]
    # reshape: a strided table (a CUDA graph's static one) gathers into a strided tensor
    k = k_cache[tables].reshape(B, M * P, Hkv, D).permute(0, 2, 3, 1).to(q.dtype)  # [B, Hkv, D, n]
    v = v_cache[tables].reshape(B, M * P, Hkv, D).transpose(1, 2).to(q.dtype)  # [B, Hkv, n, D]
    valid = torch.arange(M * P, device=q.device)[None, :] < seq_lens[:, None]  # [B, n]
    # slots past a sequence's end may hold anything, NaN included, and 0 * NaN poisons the sum
    # (zeroed in place: the gather made v a fresh copy)
    v.masked_fill_(~valid[:, None, :, None], 0)
    scores = (q.view(B, Hkv, Hq // Hkv, D) @ k).float() * scale  # [B, Hkv, G, n]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = scores.softmax(-1).to(q.dtype) @ v  # [B, Hkv, G, D]
    return o.reshape(B, Hq, D)
