"""Prefix caching: a hit reuses KV blocks and a GDN snapshot, computes fewer prompt tokens, and
changes no output."""

import pytest
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    return path, tiny_tokenizer(tmp_path_factory)


def serve_in_turn(engine, requests):
    """One request after another, so later ones can hit what earlier ones cached."""
    outs = {}
    for rid, (ids, params) in requests.items():
        outs.update(run(engine, {rid: (ids, params)}))
    return outs


@pytest.mark.parametrize("block_size", [4, 16])
def test_hit_equals_miss_and_computes_fewer_tokens(setup, block_size):
    path, tok = setup
    shared = prompt(100, 1)
    requests = {
        "a": (shared + prompt(7, 2), GREEDY),
        "b": (shared + prompt(13, 3), GREEDY),  # shares 100 tokens with a: leaves a snapshot
        "d": (shared + prompt(20, 6), GREEDY),  # a third prompt on the shared prefix: hits it
        "a2": (shared + prompt(7, 2), GREEDY),  # a again: hits a's own last boundary
        "c": (prompt(50, 4), SamplingParams(temperature=0.7, seed=9, max_tokens=8)),
    }
    cold = make_engine(path, tok, block_size=block_size, enable_prefix_caching=False)
    expected = serve_in_turn(cold, requests)
    assert cold.stats["prompt_tokens_computed"] == sum(len(r[0]) for r in requests.values())

    warm = make_engine(path, tok, block_size=block_size)
    got = serve_in_turn(warm, requests)
    for rid in requests:
        assert got[rid].outputs[0].token_ids == expected[rid].outputs[0].token_ids, rid
    a_last, shared = 106 // block_size * block_size, 100 // block_size * block_size
    assert got["a"].num_cached_tokens == 0
    # b hits a's snapshot only if a's last boundary lies within what they share; otherwise b
    # leaves a snapshot where it parts from a, and d (a third prompt on the prefix) starts there
    assert got["b"].num_cached_tokens == (a_last if a_last <= shared else 0)
    assert got["d"].num_cached_tokens == shared > 0
    assert got["a2"].num_cached_tokens == 106 // block_size * block_size
    assert got["c"].num_cached_tokens == 0
    saved = sum(o.num_cached_tokens for o in got.values())
    assert warm.stats["prompt_tokens_computed"] == cold.stats["prompt_tokens_computed"] - saved
    assert warm.cache_manager.is_empty


def test_hits_inside_one_batch_and_with_snapshot_eviction(setup):
    path, tok = setup
    shared = prompt(64, 5)
    requests = {f"r{i}": (shared + prompt(3 + i, 10 + i), GREEDY) for i in range(6)}
    expected = run(make_engine(path, tok, enable_prefix_caching=False), requests)
    # one snapshot slot for six prompts: every boundary evicts the last one
    engine = make_engine(path, tok, num_snapshot_slots=1, max_num_batched_tokens=48)
    got = run(engine, requests)
    again = run(engine, requests)
    for rid in requests:
        assert got[rid].outputs[0].token_ids == expected[rid].outputs[0].token_ids
        assert again[rid].outputs[0].token_ids == expected[rid].outputs[0].token_ids
    assert any(o.num_cached_tokens for o in again.values())
    assert engine.cache_manager.is_empty


def test_block_keys_are_chained_sha256_digests():
    """Keys are cryptographic (a collision would serve one user's cache to another), the same
    in every process, and a block's key depends on every block before it."""
    import hashlib
    from array import array

    from qwen35_ray.engine.block_manager import block_hashes

    tokens = list(range(12))
    keys = block_hashes(tokens, 4, 3)
    first = hashlib.sha256(array("q", [0, 1, 2, 3]).tobytes()).digest()
    assert keys[0] == first
    assert keys[1] == hashlib.sha256(first + array("q", [4, 5, 6, 7]).tobytes()).digest()
    other = block_hashes([99, 1, 2, 3] + tokens[4:], 4, 3)
    assert other[1] != keys[1] and other[2] != keys[2]
