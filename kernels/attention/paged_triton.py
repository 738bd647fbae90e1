"""Triton attention over the paged KV cache: split-K decode for GQA and causal (chunked) prefill.

Decode, after vLLM's paged attention v2 / flash-decoding: one program per (sequence, KV head,
partition of PARTITION cached tokens) scores the G = Hq / Hkv query heads of the group together,
so each K/V row is loaded once per group; a second launch merges the partitions by their
log-sum-exp. Prefill: one program per (block of BM new tokens, sequence, query head) runs an
online softmax over the keys up to its last query's position, earlier chunks included. Keys are
located token by token through the block table, so any page size P works.
Shapes: T new tokens, Hq/Hkv query/KV heads, D head dim, [N, P, Hkv, D] caches.
"""

import torch
import triton
import triton.language as tl
from qwen35_kernels.triton_utils import dot
from qwen35_kernels.utils import next_pow2


@triton.jit
def _load_kv(cache, block_tables, i_b, o_n, m_n, i_kvh, o_d, m_d, M, P: tl.constexpr,
             HKV: tl.constexpr, D: tl.constexpr):  # fmt: skip
    b_blk = tl.load(block_tables + i_b * M + o_n // P, mask=m_n, other=0).to(tl.int64)
    p_c = cache + ((b_blk * P + o_n % P) * HKV + i_kvh)[:, None] * D + o_d[None, :]
    return tl.load(p_c, mask=m_n[:, None] & m_d[None, :], other=0)


@triton.jit
def paged_attention_decode_fwd_kernel(
    q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse, scale, M, NUM_SPLITS,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    PARTITION: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_b, i_kvh, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    G: tl.constexpr = HQ // HKV
    L = tl.load(seq_lens + i_b)
    start = i_s * PARTITION
    if start >= L:
        return
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_h = i_kvh * G + o_g
    p_q = q + (i_b * HQ + o_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0)

    b_m = tl.full([BG], -float("inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    for n0 in range(start, tl.minimum(start + PARTITION, L), BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < L
        b_k = _load_kv(k_cache, block_tables, i_b, o_n, m_n, i_kvh, o_d, m_d, M, P, HKV, D)
        b_v = _load_kv(v_cache, block_tables, i_b, o_n, m_n, i_kvh, o_d, m_d, M, P, HKV, D)
        b_s = dot(b_q, tl.trans(b_k.to(b_q.dtype)), "tf32") * scale
        b_s = tl.where(m_n[None, :], b_s, -float("inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_alpha = tl.exp(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_q.dtype), b_v.to(b_q.dtype), "tf32")
        b_m = b_m_new
    o_mid = (i_b * HQ + o_h) * NUM_SPLITS + i_s
    p_o = mid_o + o_mid[:, None] * D + o_d[None, :]
    tl.store(p_o, b_acc / b_l[:, None], mask=m_g[:, None] & m_d[None, :])
    tl.store(mid_lse + o_mid, b_m + tl.log(b_l), mask=m_g)


@triton.jit
def paged_attention_reduce_fwd_kernel(
    mid_o, mid_lse, seq_lens, o, NUM_SPLITS,
    HQ: tl.constexpr, D: tl.constexpr, PARTITION: tl.constexpr, BS: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_splits = tl.cdiv(tl.load(seq_lens + i_b), PARTITION)
    o_s = tl.arange(0, BS)
    m_s = o_s < n_splits
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_mid = (i_b * HQ + i_h) * NUM_SPLITS + o_s
    b_lse = tl.load(mid_lse + o_mid, mask=m_s, other=-float("inf"))
    b_w = tl.exp(b_lse - tl.max(b_lse, 0))
    b_w = b_w / tl.sum(b_w, 0)
    b_o = tl.load(mid_o + o_mid[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :])
    b_o = tl.sum(tl.where(m_s[:, None], b_o * b_w[:, None], 0.0), 0)
    tl.store(o + (i_b * HQ + i_h) * D + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


@triton.jit
def paged_attention_prefill_fwd_kernel(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, o, scale, M,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_m, i_b, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    i_kvh = i_h // (HQ // HKV)
    bos = tl.load(cu_seqlens_q + i_b).to(tl.int64)
    Lq = tl.load(cu_seqlens_q + i_b + 1).to(tl.int64) - bos
    if i_m * BM >= Lq:
        return
    L = tl.load(seq_lens + i_b).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < Lq
    # new token i sits at position L - Lq + i and sees keys 0 .. L - Lq + i
    b_pos = L - Lq + o_m
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = q + ((bos + o_m) * HQ + i_h)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0)

    b_m = tl.full([BM], -float("inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    for n0 in range(0, tl.minimum(L, L - Lq + (i_m + 1) * BM), BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < L
        b_k = _load_kv(k_cache, block_tables, i_b, o_n, m_n, i_kvh, o_d, m_d, M, P, HKV, D)
        b_v = _load_kv(v_cache, block_tables, i_b, o_n, m_n, i_kvh, o_d, m_d, M, P, HKV, D)
        b_s = dot(b_q, tl.trans(b_k.to(b_q.dtype)), "tf32") * scale
        b_s = tl.where(m_n[None, :] & (o_n[None, :] <= b_pos[:, None]), b_s, -float("inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_alpha = tl.exp(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_q.dtype), b_v.to(b_q.dtype), "tf32")
        b_m = b_m_new
    p_o = o + ((bos + o_m) * HQ + i_h)[:, None] * D + o_d[None, :]
    tl.store(p_o, (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])


def paged_attention_triton(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, P, Hkv, D]
    v_cache: torch.Tensor,  # [N, P, Hkv, D]
    block_tables: torch.Tensor,  # [B, M]
    cu_seqlens_q: torch.Tensor,  # [B+1] new tokens per sequence
    seq_lens: torch.Tensor,  # [B] tokens in the cache per sequence, the new ones included
    scale: float,
    max_q_len: int | None = None,
    partition: int = 512,
    block_m: int = 64,
    block_n: int = 32,
    max_splits: int = 64,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over all of its cached tokens; [T, Hq, D]."""
    T, HQ, D = q.shape
    P, HKV = k_cache.shape[1], k_cache.shape[2]
    B, M = block_tables.shape
    assert HQ % HKV == 0, f"query heads Hq={HQ} must be a multiple of KV heads Hkv={HKV}"
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    o = torch.empty_like(q)
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
    if T == 0:
        return o
    BD = next_pow2(D)
    if max_q_len == 1:
        # the table width bounds every sequence's length, so no host sync is needed. Past
        # max_splits partitions the partitions grow instead: a CUDA graph's tables are as wide
        # as the longest context, and would otherwise launch thousands of programs per
        # sequence that find no token (16,384 blocks of 16: 512 splits of 512 -> 64 of 4,096)
        partition = max(partition, next_pow2(triton.cdiv(M * P, max_splits)))
        num_splits = triton.cdiv(M * P, partition)
        mid_o = torch.empty(B, HQ, num_splits, D, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B, HQ, num_splits, dtype=torch.float32, device=q.device)
        paged_attention_decode_fwd_kernel[(B, HKV, num_splits)](
            q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse, scale, M, num_splits,
            HQ=HQ, HKV=HKV, D=D, P=P, PARTITION=partition, BG=max(16, next_pow2(HQ // HKV)),
            BN=block_n, BD=BD,
        )  # fmt: skip
        paged_attention_reduce_fwd_kernel[(B, HQ)](
            mid_o, mid_lse, seq_lens, o, num_splits, HQ=HQ, D=D, PARTITION=partition,
            BS=next_pow2(num_splits), BD=BD,
        )  # fmt: skip
        return o
    paged_attention_prefill_fwd_kernel[(triton.cdiv(max_q_len, block_m), B, HQ)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, o, scale, M,
        HQ=HQ, HKV=HKV, D=D, P=P, BM=block_m, BN=block_n, BD=BD,
    )  # fmt: skip
    return o
