"""compile_decode: steps of pure decodes as one torch.compile graph (CPU). It must produce what
the eager engine and transformers produce, through each way a slot's DecodeKV copy goes stale:
a new sequence in the slot, a restored prefix-cache snapshot, a copy that grows past its room.
Most tests share one compiled engine; compiling takes tens of seconds on 2 cores, a few from
Inductor's cache."""

import pytest
from engine_fixtures import checkpoint, hf_greedy, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.decode_kv import GROW

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    tok = tiny_tokenizer(tmp_path_factory)
    compiled = make_engine(path, tok, max_num_seqs=8, compile_decode=True)
    return ref, path, tok, compiled


def tokens(done):
    return {rid: out.outputs[0].token_ids for rid, out in done.items()}


def test_compiled_decode_equals_eager_and_transformers(setup):
    """Six requests ending at different steps, so the batch shrinks to one sequence; the
    longest grows its copy past the first GROW tokens. The checkpoint has 8
    experts, top 3: batches of up to 5 run the graph with gathered experts, 6 the other one."""
    ref, path, tok, compiled = setup
    lengths = [1, 9, 30, 77, GROW - 3, 140]
    requests = {
        f"r{i}": (prompt(n, seed=i), SamplingParams(max_tokens=3 + 2 * i, **GREEDY))
        for i, n in enumerate(lengths)
    }
    got = tokens(run(compiled, requests))
    assert got == tokens(run(make_engine(path, tok, max_num_seqs=8), requests))
    for rid, (ids, params) in requests.items():
        assert got[rid] == hf_greedy(ref, ids, params.max_tokens), rid
    assert compiled.cache_manager.is_empty
    # every request decoded through the graphs: at least its longest run of decode steps
    steps = compiled.executor.runner.compiled_decode.steps
    assert len(steps) == 2 and min(steps) > 0
    assert sum(steps) >= max(p.max_tokens for _, p in requests.values()) - 1


def test_compiled_decode_after_prefix_hits_and_slot_reuse(setup):
    """Requests one after another reuse slot 0; the later ones share a prefix with the first
    and start from its snapshot, one of them at the same length as the first ended."""
    _, path, tok, compiled = setup
    eager = make_engine(path, tok, max_num_seqs=8)
    base = prompt(48, seed=100)
    steps = [
        {"a": (base, SamplingParams(max_tokens=8, **GREEDY))},
        {"b": (base + prompt(7, seed=101), SamplingParams(max_tokens=6, **GREEDY))},
        {"c": (base + prompt(8, seed=102), SamplingParams(max_tokens=5, **GREEDY))},
    ]
    hits = []
    for requests in steps:
        done = run(compiled, requests)
        assert tokens(done) == tokens(run(eager, requests))
        hits += [out.num_cached_tokens for out in done.values()]
    assert hits[0] == 0 and min(hits[1:]) > 0
    assert compiled.cache_manager.is_empty


def test_compiled_decode_of_one_token_prompt_alone(setup):
    """Every size at 1: one sequence in a fresh engine's slot 0 (one row of DecodeKV) decoding
    its second token, with one earlier token. Its graph was traced with 3 sequences, 5 rows and
    37 earlier tokens."""
    ref, path, tok, _ = setup
    compiled = make_engine(path, tok, max_num_seqs=4, compile_decode=True)
    requests = {"one": ([7], SamplingParams(max_tokens=5, **GREEDY))}
    got = tokens(run(compiled, requests))
    assert (
        compiled.executor.runner.compiled_decode.steps[0]
        == sum(compiled.executor.runner.compiled_decode.steps)
        == 4
    )
    assert got["one"] == hf_greedy(ref, [7], 5)
    assert compiled.cache_manager.is_empty


def test_a_second_model_in_the_process_gets_its_own_graph(setup, tmp_path_factory):
    """Graphs are cached per code object with guards on the inputs only: a dense model compiled
    after the MoE one must run its own graph, not the MoE one's."""
    ref, path = checkpoint("qwen3_5", tmp_path_factory)
    tok = setup[2]
    compiled = make_engine(path, tok, max_num_seqs=4, compile_decode=True)
    requests = {
        f"d{i}": (prompt(n, seed=200 + i), SamplingParams(max_tokens=6, **GREEDY))
        for i, n in enumerate([5, 33, 60])
    }
    got = tokens(run(compiled, requests))
    assert got == tokens(run(make_engine(path, tok, max_num_seqs=4), requests))
    for rid, (ids, params) in requests.items():
        assert got[rid] == hf_greedy(ref, ids, params.max_tokens), rid
