"""One request's failure is its own: the request ends with an error, frees its cache, and the
engine and every other request go on with the same tokens."""

import pytest
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.errors import RequestError, RequestFailed
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    tok = tiny_tokenizer(tmp_path_factory)
    engine = make_engine(path, tok)
    greedy = {"g": (prompt(9, 5), SamplingParams(max_tokens=6, **GREEDY))}
    return engine, greedy, run(engine, greedy)["g"].outputs[0].token_ids


def test_extreme_sampling_params_finish_and_leave_greedy_unchanged(setup):
    engine, greedy, before = setup
    sampled = dict(max_tokens=4, ignore_eos=True)
    requests = {
        "temperature": (prompt(7, 1), SamplingParams(temperature=1e-300, **sampled)),
        "penalty-low": (prompt(7, 2), SamplingParams(repetition_penalty=1e-300, **sampled)),
        "penalty-high": (prompt(7, 3), SamplingParams(repetition_penalty=1e300, **sampled)),
        "seed-max": (prompt(7, 4), SamplingParams(n=2, seed=2**63 - 1, **sampled)),
        "seed-min": (prompt(7, 4), SamplingParams(n=2, seed=-(2**63), **sampled)),
        **greedy,
    }
    done = run(engine, requests)
    for rid, out in done.items():
        assert out.error is None, rid
        assert [o.finish_reason for o in out.outputs] == ["length"] * len(out.outputs), rid
    assert done["g"].outputs[0].token_ids == before
    assert engine.cache_manager.is_empty


def test_a_seed_past_64_bits_still_runs(setup):
    """A seed that slipped past validation wraps to 64 bits instead of failing manual_seed."""
    engine, greedy, before = setup
    params = SamplingParams(n=2, temperature=0.8, max_tokens=3, ignore_eos=True)
    params.seed = 2**64 + 5
    done = run(engine, {"wide": (prompt(6, 1), params), **greedy})
    assert done["wide"].error is None and done["wide"].finished
    assert done["g"].outputs[0].token_ids == before


def test_a_request_failing_in_a_step_fails_alone(setup, monkeypatch, caplog):
    engine, greedy, before = setup
    engine.add_request("bad", prompt(8, 3), SamplingParams(n=2, max_tokens=6, **GREEDY))
    engine.add_request("g", *greedy["g"])
    # the detokenizer of the first of bad's two outputs breaks at its third token
    detok = engine._detok[id(engine._requests["bad"][2][0])]
    push = detok.push
    monkeypatch.setattr(
        detok, "push", lambda t: push(t) if len(detok.ids) < 2 else 1 / 0, raising=False
    )
    # the requests were added above; step them all to the end
    done = run(engine, {})
    bad = done["bad"]
    assert isinstance(bad.error, RequestFailed) and "'bad'" in str(bad.error)
    assert "ZeroDivisionError" in caplog.text and "'bad'" in caplog.text
    assert [o.finish_reason for o in bad.outputs] == ["error", "abort"]
    assert len(bad.outputs[0].token_ids) == 3
    assert done["g"].outputs[0].token_ids == before
    assert engine.cache_manager.is_empty and not engine._requests and not engine._detok


def test_a_sampling_row_that_fails_ends_only_its_request(setup):
    engine, greedy, before = setup
    # more top logprobs than the vocabulary holds: the sampler's topk raises for this row
    many = SamplingParams(logprobs=engine.config.vocab_size + 1, max_tokens=4, **GREEDY)
    done = run(engine, {"many": (prompt(5, 8), many), **greedy})
    assert isinstance(done["many"].error, RequestFailed)
    assert done["g"].outputs[0].token_ids == before
    assert engine.cache_manager.is_empty


def test_bad_logit_bias_is_refused_naming_the_range(setup):
    engine, *_ = setup
    vocab = engine.config.vocab_size
    params = SamplingParams(logit_bias={vocab: 5}, max_tokens=2)
    with pytest.raises(RequestError, match=rf"logit_bias has token id {vocab}; .* \[0, {vocab}\)"):
        engine.add_request("lb", prompt(5, 1), params)
    assert not engine.has_unfinished()


def test_an_add_that_fails_leaves_nothing_behind(setup, monkeypatch):
    engine, greedy, before = setup
    make = engine._sequence

    def second_fails(request_id, index, *args):
        if index == 1:
            raise ValueError("Overflow when unpacking long long")
        return make(request_id, index, *args)

    monkeypatch.setattr(engine, "_sequence", second_fails)
    with pytest.raises(RequestError, match="'two'.*Overflow"):
        engine.add_request("two", prompt(5, 1), SamplingParams(n=2, seed=3))
    assert not engine.has_unfinished() and not engine._detok and "two" not in engine._requests
    monkeypatch.undo()
    assert run(engine, greedy)["g"].outputs[0].token_ids == before


class BrokenFill:
    """A grammar matcher whose mask fill raises from its `at`-th call on."""

    def __init__(self, matcher, at: int):
        self.matcher, self.at, self.calls = matcher, at, 0

    def fill_next_token_bitmask(self, bitmask, index):
        self.calls += 1
        if self.calls >= self.at:
            raise RuntimeError("xgrammar: matcher state corrupted")
        return self.matcher.fill_next_token_bitmask(bitmask, index)

    def __getattr__(self, name):
        return getattr(self.matcher, name)


@pytest.fixture(scope="module")
def tiny():
    """qwen35-tiny: its tokenizer and EOS tokens make grammars (the random checkpoints have no
    EOS token to end one)."""
    return LLMEngine.from_pretrained(
        "qwen35-tiny", dtype="float32", max_model_len=512, kv_cache_memory_bytes=2**24
    )


def test_a_grammar_mask_that_fails_ends_only_its_request(tiny, caplog):
    greedy = {"g": (prompt(9, 5), SamplingParams(max_tokens=6, **GREEDY))}
    before = run(tiny, greedy)["g"].outputs[0].token_ids
    json = SamplingParams(structured={"type": "json_object"}, max_tokens=8, temperature=0)
    tiny.add_request("bad", prompt(8, 3), json)
    tiny.add_request("ok", prompt(8, 4), json)
    tiny.add_request("g", *greedy["g"])
    grammar = tiny._requests["bad"][2][0].grammar
    grammar.matcher = BrokenFill(grammar.matcher, at=2)
    # the requests were added above; step them all to the end
    done = run(tiny, {})
    bad = done["bad"]
    assert isinstance(bad.error, RequestFailed) and "'bad'" in str(bad.error)
    assert "matcher state corrupted" in caplog.text and "'bad'" in caplog.text
    assert bad.outputs[0].finish_reason == "error" and len(bad.outputs[0].token_ids) == 1
    assert done["ok"].error is None and done["ok"].finished
    assert done["g"].outputs[0].token_ids == before
    assert tiny.cache_manager.is_empty and not tiny._requests and not tiny._detok
    assert run(tiny, greedy)["g"].outputs[0].token_ids == before


def test_an_import_whose_cache_write_fails_frees_its_slot_and_blocks(setup, monkeypatch):
    engine, greedy, before = setup
    params = SamplingParams(max_tokens=4, **GREEDY)
    engine.add_request("moved", prompt(9, 6), params, prefill_only=True)
    (out,) = engine.step()
    state = out.request_state
    assert state is not None and engine.cache_manager.is_empty

    def broken(*args):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(engine.executor.cache, "write", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.import_request(state)
    assert engine.cache_manager.is_empty and not engine.has_unfinished()
    assert "moved" not in engine._requests and not engine._detok
    monkeypatch.undo()
    engine.import_request(state)
    # the requests were added above; step them all to the end
    done = run(engine, {})
    assert done["moved"].finished and done["moved"].error is None
    assert engine.cache_manager.is_empty
    assert run(engine, greedy)["g"].outputs[0].token_ids == before
