"""An expert-parallel engine gives the tokens of the single-process one: greedy and seeded,
with chunked prefill, prefix caching and preemption, on checkpoints whose expert count divides
by the group size and on one whose does not; requests spread over the ranks, imported states
continue there. Real local Ray; groups of 2 and 3 ranks with one torch thread each."""

import re

import pytest
import ray
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.distributed.build import build_engine
from qwen35_ray.distributed.config import EPConfig
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# few KV blocks (2,048 tokens a rank) for ~10,000 prompt tokens: sequences get preempted;
# a 256-token step budget: long prompts are prefilled in chunks
SMALL = dict(max_model_len=1600, num_kv_blocks=128, block_size=16, max_num_batched_tokens=256)
LENGTHS = [1, 2, 9, 31, 64, 150, 333, 480, 700, 777, 901, 1024, 1100, 1290, 1400, 1500]


def workload(vocab: int) -> dict:
    """16 prompts of 1 to 1,500 tokens; the 8 longer than 600 share a 600-token prefix."""
    shared = prompt(600, 99, vocab)
    ids = [
        shared + prompt(n - 600, i, vocab) if n > 600 else prompt(n, i, vocab)
        for i, n in enumerate(LENGTHS)
    ]
    return {f"r{i}": (p, GREEDY) for i, p in enumerate(ids)}


def tokens(done: dict) -> dict:
    return {rid: [o.token_ids for o in out.outputs] for rid, out in done.items()}


@pytest.fixture(scope="module")
def tiny_ep1():
    return build_engine("qwen35-tiny", "float32", **SMALL)


@pytest.fixture(scope="module")
def tiny_reference(tiny_ep1):
    requests = workload(tiny_ep1.config.vocab_size)
    done = tokens(run(tiny_ep1, requests))
    assert tiny_ep1.load_stats()["preemptions_total"] > 0
    return requests, done


@pytest.fixture(scope="module")
def tiny_ep2(ray_cluster):
    engine = build_engine("qwen35-tiny", "float32", ep=EPConfig(2), **SMALL)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("size", [2, 3])
def test_greedy_tokens_equal_the_single_process_engine(size, tiny_reference, tiny_ep2, ray_cluster):
    requests, expected = tiny_reference
    ep3 = lambda: build_engine("qwen35-tiny", "float32", ep=EPConfig(3), **SMALL)
    engine = tiny_ep2 if size == 2 else ep3()
    try:
        before = engine.load_stats()
        done = run(engine, requests)
        after = engine.load_stats()
        assert tokens(done) == expected
        assert after["preemptions_total"] > before["preemptions_total"]
        # the shared prefix was computed once on some rank and reused there
        assert any(out.num_cached_tokens >= 592 for out in done.values())
        # every rank ran sequences: the experts were really split
        info = engine.rank_info()
        assert [i["rank"] for i in info] == list(range(size))
        # each rank holds its share of the experts (16 over 3: 6, 5, 5), together all of them
        E = engine.config.num_experts
        for i in info:
            start, stop = i["experts"]
            assert i["expert_bytes"] * E == i["expert_bytes_total"] * (stop - start)
        assert sum(i["expert_bytes"] for i in info) == info[0]["expert_bytes_total"]
        assert all(i["all_to_all_bytes"] > 0 for i in info)
        load = engine.expert_load()
        assert load.counts.shape[1] == engine.config.num_experts and load.counts.sum() > 0
        assert after["running"] == after["waiting"] == 0
        assert after["kv_blocks_free"] == after["kv_blocks_total"] == size * 128
    finally:
        if size == 3:
            engine.shutdown()


def test_expert_count_that_does_not_divide_by_three(tmp_path_factory, ray_cluster):
    """transformers' qwen3_5_moe with 8 routed experts: ranks of 3, 3 and 2."""
    _, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    tok = tiny_tokenizer(tmp_path_factory)
    tok.save_pretrained(path)
    kw = dict(SMALL, num_kv_blocks=110)
    requests = workload(vocab=300)
    single = make_engine(path, tok, **kw)
    expected = tokens(run(single, requests))
    assert single.load_stats()["preemptions_total"] > 0
    engine = build_engine(str(path), "float32", ep=EPConfig(3), **kw)
    try:
        assert [i["experts"] for i in engine.rank_info()] == [(0, 3), (3, 6), (6, 8)]
        assert tokens(run(engine, requests)) == expected
        assert engine.load_stats()["preemptions_total"] > 0
    finally:
        engine.shutdown()


def test_seeded_sampling_equals_the_single_process_engine(tiny_ep1, tiny_ep2):
    vocab = tiny_ep1.config.vocab_size
    requests = {
        f"s{i}": (
            prompt(5 + 40 * i, 200 + i, vocab),
            SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=8, n=1 + i % 2),
        )
        for i in range(6)
    }
    expected = tokens(run(tiny_ep1, requests))
    assert tokens(run(tiny_ep2, requests)) == expected


def test_grammar_masks_and_logprobs_travel_to_the_ranks(tiny_ep1, tiny_ep2):
    """Constrained rows sample under masks filled in the driver; logprobs come back."""
    kinds = [
        {"type": "regex", "pattern": "[0-9]{3}-[a-z]{2}"},
        {"type": "grammar", "grammar": 'root ::= "yes" | "no"'},
        None,
    ]
    requests = {
        f"g{i}": (
            prompt(10 + 30 * i, 700 + i, tiny_ep1.config.vocab_size),
            SamplingParams(temperature=1.0, seed=i, max_tokens=12, logprobs=2, structured=spec),
        )
        for i, spec in enumerate(kinds)
    }
    single, multi = run(tiny_ep1, requests), run(tiny_ep2, requests)
    assert tokens(multi) == tokens(single)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", multi["g0"].outputs[0].text)
    assert multi["g1"].outputs[0].text in ("yes", "no")
    for rid, out in multi.items():
        assert out.outputs[0].finish_reason == single[rid].outputs[0].finish_reason
        got, want = out.outputs[0].logprobs, single[rid].outputs[0].logprobs
        assert [list(d) for d in got] == [list(d) for d in want]
        flat = lambda steps: [v for d in steps for v in d.values()]
        assert flat(got) == pytest.approx(flat(want), abs=1e-4)


def test_requests_spread_over_ranks_then_follow_their_prefix(tiny_ep2):
    engine, vocab = tiny_ep2, tiny_ep2.config.vocab_size
    for i in range(4):
        engine.add_request(f"spread{i}", prompt(20, 300 + i, vocab), GREEDY)
    assert [engine.rank_of(f"spread{i}") for i in range(4)] == [0, 1, 0, 1]
    for i in range(4):
        engine.abort(f"spread{i}")
    assert engine.load_stats()["running"] + engine.load_stats()["waiting"] == 0
    # a 200-token prompt computed on rank 1 (rank 0 took the first request)
    head = prompt(200, 400, vocab)
    run(engine, {"other": (prompt(30, 401, vocab), GREEDY), "first": (head, GREEDY)})
    engine.add_request("again", head[:192] + prompt(20, 402, vocab), GREEDY)
    assert engine.rank_of("again") == 1
    (out,) = run(engine, {}).values()
    assert out.num_cached_tokens == 192 and engine.rank_of("again") is None


def test_state_prefilled_in_one_process_continues_on_a_rank(tiny_ep1, tiny_ep2):
    ids = prompt(333, 500, tiny_ep1.config.vocab_size)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=10, ignore_eos=True)
    expected = tokens(run(tiny_ep1, {"whole": (ids, params)}))["whole"]
    tiny_ep1.add_request("moved", ids, params, prefill_only=True)
    (state,) = [o.request_state for o in run_all(tiny_ep1) if o.request_state is not None]
    # rank 1 is busier: the state goes to rank 0
    tiny_ep2.add_request("busy0", prompt(8, 501, 100), GREEDY)
    tiny_ep2.add_request("busy1", prompt(8, 502, 100), GREEDY)
    tiny_ep2.add_request("busy2", prompt(8, 503, 100), GREEDY)
    assert [tiny_ep2.rank_of(f"busy{i}") for i in range(3)] == [0, 1, 0]
    tiny_ep2.abort("busy0")
    tiny_ep2.abort("busy2")
    tiny_ep2.check_import(state)
    assert tiny_ep2.can_import(state)
    tiny_ep2.import_request(state)
    assert tiny_ep2.rank_of("moved") == 0
    done = run(tiny_ep2, {})
    assert tokens(done)["moved"] == expected


def test_a_request_resumed_on_the_group_equals_the_uninterrupted_one(tiny_ep1, tiny_ep2):
    """Seeded, with logprobs: its first 4 tokens from the single-process engine, the rest
    drawn on a rank from the seed and each token's position, as they were drawn there."""
    ids = prompt(60, 800, tiny_ep1.config.vocab_size)
    params = SamplingParams(
        temperature=0.8, top_p=0.95, seed=9, max_tokens=12, ignore_eos=True, logprobs=1
    )
    whole = run(tiny_ep1, {"whole": (ids, params)})["whole"].outputs[0]
    tiny_ep2.add_request(
        "again",
        ids,
        params,
        resume_token_ids=whole.token_ids[:4],
        resume_logprobs=whole.logprobs[:4],
    )
    again = run(tiny_ep2, {})["again"].outputs[0]
    assert again.token_ids == whole.token_ids and again.text == whole.text
    flat = lambda steps: [v for d in steps for v in d.values()]
    assert [list(d) for d in again.logprobs] == [list(d) for d in whole.logprobs]
    assert flat(again.logprobs) == pytest.approx(flat(whole.logprobs), abs=1e-4)
    assert tiny_ep2.load_stats()["decode_steps_total"] > 0


def run_all(engine) -> list:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_offline_llm_at_two_ranks(tiny_ep1, ray_cluster):
    ids = [prompt(n, 600 + n, tiny_ep1.config.vocab_size) for n in (3, 70, 250)]
    requests = {str(i): (p, GREEDY) for i, p in enumerate(ids)}
    expected = [tokens(run(tiny_ep1, {k: v}))[k][0] for k, v in requests.items()]
    with LLM("qwen35-tiny", "float32", expert_parallel_size=2, max_model_len=1600) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in ids], GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
        actors = llm.engine.group.actors
    # leaving the block ended the ranks
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actors[0].ping.remote(), timeout=30)
