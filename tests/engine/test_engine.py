"""The engine against transformers and against itself: batching, chunking, preemption,
sampling, stops and aborts."""

import pytest
from engine_fixtures import checkpoint, hf_greedy, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    return ref, path, tiny_tokenizer(tmp_path_factory)


def sixteen():
    return {
        f"r{i}": (prompt(1 + 13 * i, seed=i), SamplingParams(max_tokens=4 + i, **GREEDY))
        for i in range(16)
    }


def tokens(done):
    return {rid: out.outputs[0].token_ids for rid, out in done.items()}


def test_sixteen_concurrent_greedy_equal_alone_and_transformers(setup):
    ref, path, tok = setup
    requests = sixteen()
    together = tokens(run(make_engine(path, tok), requests))
    for rid, (ids, params) in requests.items():
        alone = tokens(run(make_engine(path, tok), {rid: (ids, params)}))[rid]
        assert together[rid] == alone == hf_greedy(ref, ids, params.max_tokens), rid


def test_chunked_prefill_with_a_small_budget_changes_nothing(setup):
    _, path, tok = setup
    requests = sixteen()
    full = tokens(run(make_engine(path, tok), requests))
    engine = make_engine(path, tok, max_num_batched_tokens=7)
    assert tokens(run(engine, requests)) == full


def test_preemption_when_kv_blocks_run_out(setup):
    """Short prompts admitted while blocks last, then their decodes outgrow the cache."""
    _, path, tok = setup
    requests = {
        f"p{i}": (prompt(20 + i, seed=40 + i), SamplingParams(max_tokens=60, **GREEDY))
        for i in range(8)
    }
    full = tokens(run(make_engine(path, tok), requests))
    engine = make_engine(path, tok, num_kv_blocks=12, block_size=16, max_model_len=96)
    assert tokens(run(engine, requests)) == full
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache_manager.is_empty


def test_too_large_requests_are_refused_clearly(setup):
    _, path, tok = setup
    with pytest.raises(ValueError, match="one request of max_model_len=4096 needs 256"):
        make_engine(path, tok, num_kv_blocks=8, block_size=16, max_model_len=4096)
    engine = make_engine(path, tok, max_model_len=64)
    with pytest.raises(ValueError, match="context of this model is 64"):
        engine.add_request("a", prompt(80, 1), SamplingParams())
    with pytest.raises(ValueError, match="max_tokens=40 .* exceeds the 64-token context"):
        engine.add_request("b", prompt(30, 1), SamplingParams(max_tokens=40))
    assert engine.cache_manager.is_empty and not engine.has_unfinished()


def test_seeded_sampling_is_independent_of_the_batch(setup):
    _, path, tok = setup
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True
    )
    target = {"t": (prompt(20, 99), params)}
    alone = tokens(run(make_engine(path, tok), target))["t"]
    crowd = {**sixteen(), **target}
    assert tokens(run(make_engine(path, tok, max_num_batched_tokens=32), crowd))["t"] == alone
    other_seed = SamplingParams(**{**params.__dict__, "seed": 4321})
    assert tokens(run(make_engine(path, tok), {"t": (prompt(20, 99), other_seed)}))["t"] != alone


def test_n_outputs_and_logprobs(setup):
    _, path, tok = setup
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=2, ignore_eos=True)
    out = run(make_engine(path, tok), {"x": (prompt(10, 3), params)})["x"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == 6
        for token, lp in zip(o.token_ids, o.logprobs):
            assert token in lp and len(lp) <= 3 and all(v <= 0 for v in lp.values())


def test_stop_token_ids_and_max_tokens(setup):
    _, path, tok = setup
    ids = prompt(12, 4)
    free = tokens(
        run(make_engine(path, tok), {"a": (ids, SamplingParams(max_tokens=10, **GREEDY))})
    )["a"]
    stop_at = free[4]
    params = SamplingParams(max_tokens=10, stop_token_ids=[stop_at], **GREEDY)
    out = run(make_engine(path, tok), {"a": (ids, params)})["a"].outputs[0]
    assert out.token_ids == free[: free.index(stop_at) + 1] and out.finish_reason == "stop"
    out = run(make_engine(path, tok), {"a": (ids, SamplingParams(max_tokens=3, **GREEDY))})
    assert out["a"].outputs[0].finish_reason == "length"
    assert len(out["a"].outputs[0].token_ids) == 3


def test_stop_string_found_across_token_boundaries(setup):
    _, path, tok = setup
    ids = prompt(12, 8)
    free = run(make_engine(path, tok), {"a": (ids, SamplingParams(max_tokens=24, **GREEDY))})
    text = free["a"].outputs[0].text
    # a stop string straddling two tokens' text: the last 2 chars of one, the first of the next
    pieces = [tok.decode([t]) for t in free["a"].outputs[0].token_ids]
    i = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 2 and pieces[i])
    stop = pieces[i - 1][-2:] + pieces[i][0]
    params = SamplingParams(max_tokens=24, stop=[stop], **GREEDY)
    out = run(make_engine(path, tok), {"a": (ids, params)})["a"].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_aborts_free_every_slot_and_block(setup):
    _, path, tok = setup
    engine = make_engine(path, tok, max_num_batched_tokens=16)
    for rid, (ids, params) in sixteen().items():
        engine.add_request(rid, ids, params)
    for _ in range(3):
        engine.step()
    assert not engine.cache_manager.is_empty
    for rid in list(sixteen()):
        engine.abort(rid)
    assert engine.cache_manager.is_empty and not engine.has_unfinished()


def test_state_slots_sized_from_a_memory_budget(setup):
    from qwen35_ray.model.cache import HybridCache

    _, path, tok = setup
    probe = make_engine(path, tok)
    per_slot = HybridCache.bytes_per_slot(probe.config, probe.dtype)
    engine = make_engine(
        path, tok, state_memory_bytes=3 * per_slot + 7, enable_prefix_caching=False
    )
    assert engine.cache_manager.slots.size == 3 and engine.executor.cache.num_slots == 3
    done = run(engine, sixteen())  # 16 requests through 3 slots
    assert len(done) == 16 and engine.cache_manager.is_empty
    shared = make_engine(path, tok, state_memory_bytes=6 * per_slot)
    assert (shared.cache_manager.slots.size, shared.cache_manager.snapshot_slots.size) == (3, 3)
    with pytest.raises(ValueError, match="holds 1 GDN state slots .* one request needs 2"):
        make_engine(path, tok, state_memory_bytes=per_slot)


def test_pending_prompt_tokens_count_the_rest_of_a_chunked_prefill(setup):
    """A prompt part-way through its prefill still has its remaining tokens pending: what its
    first token waits for, and what the prefill autoscaler reads."""
    _, path, tok = setup
    engine = make_engine(path, tok, max_num_batched_tokens=32, long_prefill_token_threshold=0)
    engine.add_request("long", prompt(100, 5), SamplingParams(temperature=0, max_tokens=2))
    assert engine.load_stats()["pending_prompt_tokens"] == 100
    engine.step()  # the first 32-token chunk
    stats = engine.load_stats()
    assert (stats["running"], stats["waiting_prompt_tokens"]) == (1, 0)
    assert stats["pending_prompt_tokens"] == 68
