"""Resume: a request stopped after k tokens and resumed in a fresh engine from its prompt and
those k tokens ends with the tokens, text, logprobs and finish reason of the uninterrupted run:
greedy, seeded sampling with penalties, a JSON schema, stop strings, a thinking budget. What
cannot be resumed is refused before anything is queued. The embedded qwen35-tiny has random
weights, so every token here is the engine's doing."""

import asyncio
import json

import jsonschema
import pytest
from engine_fixtures import prompt
from json_schemas import PERSON

from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.errors import RequestError
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams

FREE = dict(max_tokens=32, ignore_eos=True)
SEEDED = dict(
    temperature=0.8,
    top_p=0.9,
    top_k=50,
    presence_penalty=0.5,
    frequency_penalty=0.3,
    repetition_penalty=1.2,
    seed=7,
)


def new_engine(**kw) -> LLMEngine:
    kw = dict(max_model_len=256, kv_cache_memory_bytes=2**24, **kw)
    return LLMEngine.from_pretrained("qwen35-tiny", dtype="float32", **kw)


@pytest.fixture(scope="module")
def engine():
    """Runs every request uninterrupted, and again up to the point it is stopped."""
    return new_engine()


def finish(engine, rid, ids, params, **resume):
    """Run one request to its end; its final CompletionOutput."""
    engine.add_request(rid, ids, params, **resume)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.request_id == rid else out
    assert out.finished and out.error is None
    assert engine.cache_manager.is_empty
    return out.outputs[0]


def stop_after(engine, rid, ids, params, k):
    """Run one request until it has k tokens, then abort it: (output then, the text it
    showed)."""
    engine.add_request(rid, ids, params)
    while True:
        (out,) = engine.step()
        if len(out.outputs[0].token_ids) == k:
            engine.abort(rid)
            assert engine.cache_manager.is_empty and not out.finished
            return out.outputs[0]


def resumed(engine, ids, params, k):
    """(uninterrupted output, output resumed in a fresh engine after k tokens)."""
    whole = finish(engine, "whole", ids, params)
    part = stop_after(engine, "part", ids, params, k)
    assert part.token_ids == whole.token_ids[:k]
    logprobs = part.logprobs if params.logprobs is not None else None
    again = finish(
        new_engine(),
        "again",
        ids,
        params,
        resume_token_ids=part.token_ids,
        resume_logprobs=logprobs,
    )
    # a resumed stream shows at least what the stopped one had shown
    assert again.text.startswith(part.text)
    return whole, again


def same(whole, again):
    assert again.token_ids == whole.token_ids
    assert again.text == whole.text
    assert again.finish_reason == whole.finish_reason


def text_ids(engine, text="Tell me a story about a cat."):
    return engine.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("k", [1, 5, 31])
def test_greedy(engine, k):
    same(*resumed(engine, prompt(40, 1, 1000), SamplingParams(temperature=0, **FREE), k))


@pytest.mark.parametrize("k", [1, 9])
def test_seeded_sampling_with_penalties(engine, k):
    params = SamplingParams(**SEEDED, **FREE)
    whole, again = resumed(engine, text_ids(engine), params, k)
    same(whole, again)
    # the seed decides the draws: a second uninterrupted run is the same, another seed is not
    assert finish(engine, "twice", text_ids(engine), params).token_ids == whole.token_ids
    other = SamplingParams(**{**SEEDED, "seed": 8}, **FREE)
    assert finish(engine, "other", text_ids(engine), other).token_ids != whole.token_ids


@pytest.mark.parametrize("k", [1, 6])
def test_json_schema(engine, k):
    params = SamplingParams(
        temperature=1.0,
        seed=11,
        max_tokens=150,
        structured={"type": "json_schema", "schema": PERSON},
    )
    whole, again = resumed(engine, text_ids(engine, "Reply in JSON: who are you?"), params, k)
    same(whole, again)
    assert again.finish_reason == "stop"
    jsonschema.validate(json.loads(again.text), PERSON)


def test_stop_string_ends_the_resumed_text_where_it_ended(engine):
    ids = text_ids(engine)
    free = finish(engine, "free", ids, SamplingParams(**SEEDED, max_tokens=48, ignore_eos=True))
    tok = engine.tokenizer
    # a 3-character stop string that first occurs after the 8th token's text
    start = len(tok.decode(free.token_ids[:8]))
    at = next(i for i in range(start, len(free.text) - 3) if free.text[i : i + 3].strip())
    stop = free.text[at : at + 3]
    assert stop not in free.text[: at + 2]
    params = SamplingParams(**SEEDED, max_tokens=48, ignore_eos=True, stop=[stop])
    whole, again = resumed(engine, ids, params, 8)
    same(whole, again)
    assert again.finish_reason == "stop" and again.text == free.text[:at]


def thinking_ids(engine, text="Think it over.") -> list[int]:
    return engine.tokenizer(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )["input_ids"]


@pytest.mark.parametrize("k", [3, 8, 9])
def test_thinking_budget(engine, k):
    """Stopped before, at and after the budget is spent: </think> comes where it came."""
    params = SamplingParams(temperature=1.0, seed=3, thinking_token_budget=8, **FREE)
    whole, again = resumed(engine, thinking_ids(engine), params, k)
    same(whole, again)
    assert engine.tokenizer.convert_tokens_to_ids("</think>") in again.token_ids


@pytest.mark.parametrize("k", [5, 24])
def test_thinking_budget_then_a_json_answer(engine, k):
    """The grammar starts at </think>: stopped inside the reasoning, and inside the answer."""
    params = SamplingParams(
        temperature=1.0,
        seed=2,
        max_tokens=120,
        thinking_token_budget=16,
        structured={"type": "json_object", "after": "</think>"},
    )
    same(*resumed(engine, thinking_ids(engine, "Reply in JSON."), params, k))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal(engine, temperature):
    params = SamplingParams(temperature=temperature, seed=5, logprobs=3, **FREE)
    whole, again = resumed(engine, prompt(30, 2, 1000), params, 10)
    same(whole, again)
    assert len(again.logprobs) == len(again.token_ids) == 32
    # the resumed ones are those given; after them, the states were computed by the prefill
    # kernels instead of one decode at a time, which differs by float rounding (seen: 2e-4)
    assert again.logprobs[:10] == whole.logprobs[:10]
    for got, want in zip(again.logprobs, whole.logprobs):
        assert got.keys() == want.keys()
        assert all(abs(got[t] - want[t]) < 1e-3 for t in want)


def test_max_tokens_counts_the_resumed_tokens(engine):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    whole, again = resumed(engine, prompt(20, 3, 1000), params, 4)
    same(whole, again)
    assert len(again.token_ids) == 10 and again.finish_reason == "length"


def test_the_prefix_cache_serves_a_resumed_prompt(engine):
    ids, params = prompt(50, 4, 1000), SamplingParams(temperature=0, **FREE)
    whole = finish(engine, "whole", ids, params)
    fresh = new_engine()
    finish(fresh, "first", ids, SamplingParams(temperature=0, max_tokens=1))
    fresh.add_request("again", ids, params, resume_token_ids=whole.token_ids[:6])
    outs = []
    while fresh.has_unfinished():
        outs.extend(fresh.step())
    assert outs[-1].outputs[0].token_ids == whole.token_ids
    assert outs[-1].num_cached_tokens == 48


def refused(engine, message, ids, params, **resume):
    with pytest.raises(RequestError, match=message):
        engine.add_request("refused", ids, params, **resume)
    assert not engine.has_unfinished() and "refused" not in engine._requests
    assert not engine._detok and engine.cache_manager.is_empty


def test_what_cannot_be_resumed_is_refused(engine):
    ids, greedy = prompt(20, 5, 1000), SamplingParams(temperature=0, **FREE)
    tokens = finish(engine, "whole", ids, greedy).token_ids
    with_max = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    refused(
        engine,
        "max_tokens=5: the request is already complete",
        ids,
        with_max,
        resume_token_ids=tokens[:5],
    )
    # 20 prompt tokens and 236 resumed ones fill the 256-token context
    long = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    refused(engine, "fill the 256-token context", ids, long, resume_token_ids=[7] * 236)
    refused(engine, "needs n=1, got n=2", ids, SamplingParams(n=2), resume_token_ids=tokens[:2])
    refused(engine, "token id 5000", ids, greedy, resume_token_ids=[1, 5000])
    refused(
        engine,
        "resume_logprobs has 0 entries for 2",
        ids,
        SamplingParams(temperature=0, logprobs=1),
        resume_token_ids=tokens[:2],
    )
    refused(engine, "resume_logprobs needs resume_token_ids", ids, greedy, resume_logprobs=[])
    # an end-of-sequence token would have finished it
    eos = min(engine.eos_token_ids)
    refused(
        engine,
        r"resume_token_ids\[1\]=.* already ends the request",
        ids,
        SamplingParams(temperature=0),
        resume_token_ids=[tokens[0], eos],
    )
    # a JSON object cannot start with a letter
    schema = SamplingParams(structured={"type": "json_object"})
    letter = engine.tokenizer("x", add_special_tokens=False)["input_ids"]
    refused(engine, "does not follow the request's grammar", ids, schema, resume_token_ids=letter)
    # thinking_token_budget=0 forces </think> first
    budget = SamplingParams(thinking_token_budget=0)
    refused(
        engine,
        "is not the </think> that thinking_token_budget=0 forces",
        thinking_ids(engine),
        budget,
        resume_token_ids=tokens[:1],
    )


def test_async_engine_resumes_and_counts_its_steps(engine):
    ids, params = prompt(25, 6, 1000), SamplingParams(**SEEDED, **FREE)
    whole = finish(engine, "whole", ids, params)
    async_engine = AsyncEngine(new_engine())
    before = async_engine.stats()

    async def main():
        stream = async_engine.generate(
            "again", ids, params, resume_token_ids=whole.token_ids[:12], resume_logprobs=None
        )
        return [o async for o in stream]

    outs = asyncio.run(main())
    assert outs[0].outputs[0].token_ids == whole.token_ids[:13]
    assert outs[-1].outputs[0].token_ids == whole.token_ids
    stats = async_engine.stats()
    assert before["steps_total"] == before["decode_steps_total"] == 0
    # the prompt and the 12 tokens are prefilled (in two chunks: a snapshot boundary at 16),
    # the 13th token is sampled, then 19 decode steps
    assert stats["steps_total"] == 21 and stats["decode_steps_total"] == 19
    assert 0 < stats["decode_step_seconds_total"] < stats["step_seconds_total"]
    # the step thread's CPU time in those steps: some, and no more than their wall time
    assert 0 < stats["step_cpu_seconds_total"] <= stats["step_seconds_total"] * 1.01 + 1e-3
    assert stats["generation_tokens_total"] == 20

    async def bad():
        async for _ in async_engine.generate("bad", ids, SamplingParams(n=2), resume_token_ids=[1]):
            pass

    with pytest.raises(RequestError, match="needs n=1"):
        asyncio.run(bad())
