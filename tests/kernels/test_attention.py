"""Paged attention (decode and chunked prefill, GQA) against contiguous fp32 attention."""

import pytest
import torch
from kernel_asserts import (
    DTYPES,
    TRITON_DEVICE,
    assert_close,
    cu_seqlens,
    nan_filled_buffers,
    needs_triton,
)
from qwen35_kernels.attention import paged_attention, paged_attention_triton, write_kv
from qwen35_kernels.attention.naive import naive_attention

HQ, HKV, D, P, BLOCKS, WIDTH = 4, 2, 32, 16, 40, 8
CASES = {
    # one new token per sequence; 70 cached tokens span several partitions of the Triton decode
    "decode": ([1, 1, 1], [69, 4, 32]),
    # 63 new tokens after 65 cached ones (chunked prefill), a fresh prompt, a single token
    "prefill": ([63, 17, 1], [65, 0, 10]),
}


def _inputs(case, dtype, device):
    torch.manual_seed(42)
    q_lens, ctx = CASES[case]
    seq = [a + b for a, b in zip(q_lens, ctx)]
    B = len(seq)
    tables = torch.randperm(BLOCKS)[: B * WIDTH].view(B, WIDTH).to(torch.int32)
    # unused cache rows hold NaN: reading one poisons the output
    k_cache = torch.full((BLOCKS, P, HKV, D), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    ks = [torch.randn(L, HKV, D, dtype=dtype) for L in seq]
    vs = [torch.randn(L, HKV, D, dtype=dtype) for L in seq]
    for b in range(B):
        pos = torch.arange(seq[b])
        write_kv(ks[b], vs[b], k_cache, v_cache, tables[b][pos // P].long() * P + pos % P)
    q = torch.randn(sum(q_lens), HQ, D, dtype=dtype)
    cu = cu_seqlens(q_lens)
    ref = torch.cat(
        [naive_attention(q[cu[b] : cu[b + 1]], ks[b], vs[b], D**-0.5) for b in range(B)]
    )
    args = [t.to(device) for t in (q, k_cache, v_cache, tables, cu, torch.tensor(seq))]
    return args, max(q_lens), ref


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention(case, dtype):
    args, max_q_len, ref = _inputs(case, dtype, "cpu")
    out = paged_attention(*args, D**-0.5, max_q_len)
    assert_close("paged_attention", out, ref, dtype)


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_triton(case, dtype):
    args, max_q_len, ref = _inputs(case, dtype, TRITON_DEVICE)
    with nan_filled_buffers():
        out = paged_attention_triton(*args, D**-0.5, max_q_len, partition=32, block_m=16,
                                     block_n=16)  # fmt: skip
    assert_close("paged_attention_triton", out, ref, dtype)


@needs_triton
def test_paged_decode_with_fewer_splits_than_the_table_holds():
    """A table wider than max_splits partitions (a CUDA graph's, sized for the longest
    context): the partitions grow, here from 16 to 64 tokens, and the 70-token sequence
    still spans two of them."""
    args, max_q_len, ref = _inputs("decode", torch.float32, TRITON_DEVICE)
    with nan_filled_buffers():
        out = paged_attention_triton(*args, D**-0.5, max_q_len, partition=16, block_n=16,
                                     max_splits=2)  # fmt: skip
    assert_close("paged_attention_triton", out, ref, torch.float32)
