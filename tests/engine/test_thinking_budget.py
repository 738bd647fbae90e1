"""thinking_token_budget: after that many tokens inside <think> the engine writes </think>
(once the current character is whole), and a grammar that starts after </think> still gets
its answer written within max_tokens. The tiny model's weights are random: it would think
forever, and whatever follows the budget is the engine's doing."""

import json
from dataclasses import replace

import jsonschema
import pytest
from json_schemas import WEATHER_ARGS

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.serving.chat import ChoiceParser, render_prompt
from qwen35_ray.serving.protocol import ChatCompletionRequest
from qwen35_ray.serving.structured import chat_spec


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_pretrained(
        "qwen35-tiny", dtype="float32", max_model_len=1024, kv_cache_memory_bytes=2**24
    )


def run(engine, ids, params, rid="r"):
    engine.add_request(rid, ids, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                return out


def thinking_prompt(engine, text="Think it over.") -> list[int]:
    return engine.tokenizer(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )["input_ids"]


def end_position(engine, token_ids, budget) -> int:
    """Where </think> was written, checked against the budget: at the budget, or later only
    while the text so far ended inside a character."""
    tok = engine.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    assert end not in token_ids[:budget]
    at = token_ids.index(end)
    for k in range(budget, at):
        assert tok.decode(token_ids[:k]).endswith("\ufffd"), (budget, at, k)
    return at


@pytest.mark.parametrize("budget", [0, 8])
def test_think_end_is_forced_at_the_budget(engine, budget):
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, thinking_token_budget=budget
    )
    out = run(engine, thinking_prompt(engine), params).outputs[0]
    end_position(engine, out.token_ids, budget)
    # forced once: out of reasoning, the sequence writes freely again
    end = engine.tokenizer.convert_tokens_to_ids("</think>")
    assert out.token_ids.count(end) == 1 and len(out.token_ids) == 24


def test_forced_token_keeps_the_models_logprobs(engine):
    params = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, thinking_token_budget=0, logprobs=1
    )
    out = run(engine, thinking_prompt(engine), params).outputs[0]
    end = engine.tokenizer.convert_tokens_to_ids("</think>")
    assert out.token_ids[0] == end
    first = out.logprobs[0]
    # </think>'s own logprob, and the model's likeliest token beside it
    assert end in first and len(first) == 2 and first[end] < max(first.values())


def test_outside_reasoning_nothing_is_forced(engine):
    ids = engine.tokenizer("<think>\nhmm\n</think>\n\nAnswer:")["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_token_budget=0)
    out = run(engine, ids, params).outputs[0]
    assert engine.tokenizer.convert_tokens_to_ids("</think>") not in out.token_ids


def test_json_answer_after_a_spent_budget(engine):
    """Every answer stops and parses: the schema bounds its one string, so the grammar ends
    within a few tokens of </think> whatever the random model prefers."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
    }
    params = SamplingParams(
        n=4,
        temperature=1.0,
        seed=7,
        max_tokens=200,
        thinking_token_budget=16,
        structured={"type": "json_schema", "schema": schema, "after": "</think>"},
    )
    outs = run(engine, thinking_prompt(engine, "Reply in JSON."), params).outputs
    for o in outs:
        assert o.finish_reason == "stop"
        end_position(engine, o.token_ids, 16)
        _, answer = o.text.split("</think>")
        jsonschema.validate(json.loads(answer), schema)


def test_forced_tool_call_with_thinking_on(engine):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}}]
    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}],
        tools=tools,
        tool_choice="required",
    )
    prompt = render_prompt(engine.tokenizer, req)
    assert prompt.endswith("<think>\n")
    spec = chat_spec(req, prompt_in_reasoning=True)
    params = SamplingParams(
        n=3, temperature=1.0, seed=2, max_tokens=200, thinking_token_budget=32, structured=spec
    )
    outs = run(engine, engine.tokenizer(prompt)["input_ids"], params).outputs
    for out in outs:
        assert out.finish_reason == "stop"
        end_position(engine, out.token_ids, 32)
        (call,) = ChoiceParser(prompt, req).whole(out.text)["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_ARGS)


def test_a_grammar_after_reasoning_is_never_skipped_by_a_stop_inside_it(engine):
    """A model that would stop at once (its <|im_end|> biased far above all else) cannot while
    its grammar waits for </think>: it thinks until the budget closes reasoning, writes the
    answer, and only then stops. Before, it stopped with an empty answer."""
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.eos_token_ids
    params = SamplingParams(
        temperature=1.0,
        seed=5,
        max_tokens=40,
        thinking_token_budget=8,
        logit_bias={im_end: 100.0},
        structured={"type": "grammar", "grammar": 'root ::= "yes"', "after": "</think>"},
    )
    out = run(engine, thinking_prompt(engine), params).outputs[0]
    at = end_position(engine, out.token_ids, 8)
    assert im_end not in out.token_ids[:at]
    assert out.finish_reason == "stop"
    assert out.text.split("</think>")[1] == "yes"
    # the same bias without a grammar stops at the first token
    free = replace(params, structured=None, thinking_token_budget=None)
    free = run(engine, thinking_prompt(engine), free, rid="free")
    assert free.outputs[0].token_ids == [im_end] and free.outputs[0].text == ""


def test_budget_range_and_a_model_without_reasoning_tokens(engine, monkeypatch):
    with pytest.raises(ValueError, match="thinking_token_budget=-1 must be >= 0"):
        SamplingParams(thinking_token_budget=-1)
    monkeypatch.setattr(engine, "think", None)
    with pytest.raises(ValueError, match="thinking_token_budget=4 needs .* <think>"):
        engine.check_request([1, 2, 3], SamplingParams(thinking_token_budget=4))
