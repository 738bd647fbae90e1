"""compile_decode: steps of pure decodes as one torch.compile graph (CPU). It must produce what
the eager engine and transformers produce, through each way a slot's DecodeKV copy goes stale:
a new sequence in the slot, a restored prefix-cache snapshot, a copy that grows past its room.
Most tests share one compiled engine; compiling takes tens of seconds on 2 cores, a few from
Inductor's cache."""

import pytest
import torch
from engine_fixtures import checkpoint, hf_greedy, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.decode_kv import GROW

GREEDY = dict(temperature=0, ignore_eos=True)
# the test checkpoint has 8 experts, top 3: compiled, batches of up to 21 sequences (64
# pairs, gathers_experts) run the graph with gathered experts, larger ones the other one
LARGE = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    tok = tiny_tokenizer(tmp_path_factory)
    # more slots than the batches that run with gathered experts (see the last test)
    compiled = make_engine(path, tok, max_num_seqs=LARGE, compile_decode=True)
    return ref, path, tok, compiled


def tokens(done):
    return {rid: out.outputs[0].token_ids for rid, out in done.items()}


def test_compiled_decode_equals_eager_and_transformers(setup):
    """Six requests ending at different steps, so the batch shrinks to one sequence; the
    longest grows its copy past the first GROW tokens. All run the graph with gathered
    experts."""
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
    assert compiled.executor.wait_compiled(timeout=0)  # compiled at start-up: ready at once
    # every request decoded through the gathered graph: at least its longest run of decodes
    steps = compiled.executor.runner.compiled_decode.steps
    assert len(steps) == 2 and steps[0] >= max(p.max_tokens for _, p in requests.values()) - 1


def test_compiled_decode_of_a_batch_past_the_gathered_experts(setup):
    """LARGE requests at once: their decode steps run the graph with every expert dense, and
    give what the eager engine gives."""
    _, path, tok, compiled = setup
    before = list(compiled.executor.runner.compiled_decode.steps)
    requests = {
        f"b{i}": (prompt(3 + 5 * i, seed=300 + i), SamplingParams(max_tokens=4, **GREEDY))
        for i in range(LARGE)
    }
    got = tokens(run(compiled, requests))
    assert got == tokens(run(make_engine(path, tok, max_num_seqs=LARGE), requests))
    assert compiled.executor.runner.compiled_decode.steps[1] > before[1]
    assert compiled.cache_manager.is_empty


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


def test_background_compile_takes_over_without_recompiling(setup, monkeypatch):
    """The default (compile_decode None, auto): the engine starts at once and decodes eagerly
    while its graph compiles in the background on stand-in states; once ready, the decode
    steps run the graph, which the live cache's shapes do not make recompile. The tokens are
    the eager engine's throughout."""
    _, path, tok, _ = setup
    monkeypatch.delenv("QWEN35_RAY_COMPILE_DECODE", raising=False)
    engine = make_engine(path, tok, max_num_seqs=4)
    compiled = engine.executor.runner.compiled_decode
    assert compiled is not None
    eager = make_engine(path, tok, max_num_seqs=4, compile_decode=False)
    assert eager.executor.runner.compiled_decode is None
    first = {"e": (prompt(20, seed=400), SamplingParams(max_tokens=6, **GREEDY))}
    assert tokens(run(engine, first)) == tokens(run(eager, first))
    assert engine.executor.wait_compiled(timeout=600), compiled.error
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    later = {
        f"l{i}": (prompt(n, seed=410 + i), SamplingParams(max_tokens=8, **GREEDY))
        for i, n in enumerate([3, 40, GROW + 9])
    }
    assert tokens(run(engine, later)) == tokens(run(eager, later))
    assert compiled.steps[0] >= 7
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def staggered(engine, requests: dict, every: int) -> dict:
    """Requests added one every `every` steps, as arrivals over HTTP come: most steps after
    the first add a prompt to running decodes. Returns the tokens of each."""
    pending, done, n = list(requests.items()), {}, 0
    while pending or engine.has_unfinished():
        if pending and n % every == 0:
            rid, (ids, params) = pending.pop(0)
            engine.add_request(rid, ids, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        n += 1
    return done


def test_a_step_adding_prompts_to_decodes_runs_the_decodes_through_the_graph(setup):
    """A step that mixes decodes with prompt chunks (one per arrival over HTTP): its decode
    rows run the graph and the chunks eagerly, and every token is the eager engine's and
    transformers'. One prompt is long enough to be chunked beside the decodes."""
    ref, path, tok, compiled = setup
    graph = compiled.executor.runner.compiled_decode
    requests = {
        f"m{i}": (prompt(n, seed=500 + i), SamplingParams(max_tokens=6, **GREEDY))
        for i, n in enumerate([12, 40, 9, 300, 25])
    }
    before, counters = sum(graph.steps), compiled.step_counters
    decode_steps = counters.decode_steps
    got = staggered(compiled, requests, every=2)
    assert got == staggered(make_engine(path, tok, max_num_seqs=8), requests, every=2)
    for rid, (ids, params) in requests.items():
        assert got[rid] == hf_greedy(ref, ids, params.max_tokens), rid
    # every step with a decode ran the graph, those that also took a prompt chunk included
    # (arrivals every 2 steps while others decode: most steps here are such)
    assert sum(graph.steps) - before == counters.decode_steps - decode_steps > 10
    assert compiled.cache_manager.is_empty
