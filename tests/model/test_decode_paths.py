"""The fast CPU decode paths, on odd shapes: the attention layer's decode over DecodeKV against
paged_attention, and the kernels' CPU paths for the recurrent step and the dense experts
against their fp32 references. Each must give the same answer and leave the same state.
"""

import pytest
import torch
from qwen35_kernels.attention import paged_attention
from qwen35_kernels.gdn import fused_recurrent_gated_delta_rule
from qwen35_kernels.gdn.naive import naive_recurrent_gated_delta_rule
from qwen35_kernels.moe import fused_moe, topk_softmax
from qwen35_kernels.moe.naive import naive_moe

from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.decode_kv import DecodeKV
from qwen35_ray.model.loader import load_model

BLOCK = 16


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(42)


@pytest.mark.parametrize("lengths", [[1], [63, 1, 130, 17, 16]])
def test_decode_attention_matches_paged_attention(lengths):
    """The attention layer's CPU decode over DecodeKV against paged_attention, for three steps:
    the first refills every slot from its blocks, the next ones only append. Slots are out of
    order and leave gaps, whose rows nobody reads."""
    g = gen()
    config = load_model("qwen35-tiny", dtype="float32", progress=False)[1]
    scale = config.head_dim**-0.5
    Hkv, D = config.num_key_value_heads, config.head_dim
    # cache slots nobody wrote hold NaN: a masked position must not leak into the output
    k_cache = torch.full((64, BLOCK, Hkv, D), float("nan"))
    v_cache = torch.full((64, BLOCK, Hkv, D), float("nan"))
    blocks = torch.randperm(64, generator=g).tolist()
    slots = [7, 2, 0, 5, 3][: len(lengths)]
    tables = [[blocks.pop() for _ in range(-(-(n + 2) // BLOCK))] for n in lengths]
    decode_kv = DecodeKV(8, Hkv, D, torch.float32)
    for step in range(3):
        chunks, new_k, new_v = [], [], []
        for n, slot, table in zip(lengths, slots, tables):
            n += step
            chunks.append(SeqChunk(n - 1, 1, slot, table))
            for p in range(n - 1 if step else 0, n):
                k_cache[table[p // BLOCK], p % BLOCK] = torch.randn(Hkv, D, generator=g)
                v_cache[table[p // BLOCK], p % BLOCK] = torch.randn(Hkv, D, generator=g)
            new_k.append(k_cache[table[(n - 1) // BLOCK], (n - 1) % BLOCK])
            new_v.append(v_cache[table[(n - 1) // BLOCK], (n - 1) % BLOCK])
        batch = ForwardBatch.build(chunks, BLOCK)
        q = torch.randn(len(lengths), config.num_attention_heads, D, generator=g)
        expected = paged_attention(
            q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens, batch.seq_lens,
            scale, 1,
        )  # fmt: skip
        k, v = torch.stack(new_k), torch.stack(new_v)
        # the first step under inference mode, the next ones outside: the copies follow
        with torch.inference_mode(step == 0):
            got = decode_kv.decode(q, k, v, batch, k_cache, v_cache, scale)
        torch.testing.assert_close(got, expected)
        assert [decode_kv.length[s] for s in slots] == [n + step for n in lengths]


def test_decode_kv_copy_goes_stale_when_the_slot_changes_hands():
    """A slot reused by another sequence of the same length must not read the old copy: a
    restored or imported state (HybridCache.copy_slot / write) marks the slot stale."""
    config = load_model("qwen35-tiny", dtype="float32", progress=False)[1]
    cache = HybridCache.allocate(config, num_slots=4, num_blocks=8, block_size=BLOCK,
                                 dtype=torch.float32)  # fmt: skip
    for d in cache.decode_kv:
        d.length[1] = d.length[2] = 20
    cache.copy_slot(3, 1)
    n_attn = len(cache.decode_kv)
    state = cache.read(0, [0, 1], 20, n_attn)
    cache.write(2, [4, 5], state)
    assert all(d.length[1] == d.length[2] == -1 for d in cache.decode_kv)


def test_recurrent_decode_cpu_path_matches_the_reference():
    """The CPU path of fused_recurrent_gated_delta_rule (batched matmuls) against the fp32
    per-sequence reference, slots updated in place."""
    g = gen()
    B, H, HV, K, V, S = 5, 2, 4, 32, 32, 7
    q, k = torch.randn(B, H, K, generator=g), torch.randn(B, H, K, generator=g)
    v = torch.randn(B, HV, V, generator=g)
    decay = -torch.rand(B, HV, generator=g)
    beta = torch.rand(B, HV, generator=g)
    state = torch.randn(S, HV, K, V, generator=g)
    slots = torch.tensor([6, 0, 3, 2, 5])
    expected_state = state.clone()
    expected = []
    for b, slot in enumerate(slots.tolist()):
        one = (x[b : b + 1] for x in (q, k, v, decay, beta))
        o, final = naive_recurrent_gated_delta_rule(*one, initial_state=state[slot])
        expected.append(o[0])
        expected_state[slot] = final
    got = fused_recurrent_gated_delta_rule(q, k, v, decay, beta, state, slots)
    torch.testing.assert_close(got, torch.stack(expected))
    torch.testing.assert_close(state, expected_state)


@pytest.mark.parametrize("T", [1, 4, 5, 13])
def test_small_batch_experts_match_the_reference(T):
    """fused_moe's small-batch CPU paths: up to E (token, expert) pairs (T <= 4 here) the
    chosen experts' weights gathered per pair, above that every expert with unchosen ones
    weighted 0."""
    g = gen()
    E, I, H = 16, 64, 128
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    x = torch.randn(T, H, generator=g)
    weights, ids = topk_softmax(torch.randn(T, E, generator=g), 4)
    expected = naive_moe(x, w_gate_up, w_down, weights, ids)
    torch.testing.assert_close(fused_moe(x, w_gate_up, w_down, weights, ids), expected)
