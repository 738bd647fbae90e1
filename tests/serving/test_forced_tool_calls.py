"""A forced tool call's arguments parse as JSON and validate against the tool's schema, for
schemas with `$defs`/`$ref` (what `openai.pydantic_function_tool` writes for a nested model),
nested objects and arrays: 100 seeded tries on the random-weight tiny model, so whatever is
valid is valid because of the grammar."""

import json
from typing import Annotated

import jsonschema
import openai
import pytest
from json_schemas import LEGACY_ARGS, ORDER_ARGS
from pydantic import BaseModel, Field

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.serving.chat import ChoiceParser, render_prompt
from qwen35_ray.serving.protocol import ChatCompletionRequest
from qwen35_ray.serving.structured import chat_spec

TRIES = 100


class Address(BaseModel):
    street: str = Field(max_length=6)
    zip: int = Field(ge=0, le=99999)


class Person(BaseModel):
    name: str = Field(max_length=6)
    home: Address
    tags: list[Annotated[str, Field(max_length=4)]] = Field(max_length=2)
    work: Address | None


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


PYDANTIC_TOOL = openai.pydantic_function_tool(Person, name="save_person")
TOOLS = [tool("place_order", ORDER_ARGS), tool("trace_route", LEGACY_ARGS), PYDANTIC_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_pretrained(
        "qwen35-tiny",
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=TRIES,
        kv_cache_memory_bytes=2**26,
    )


def request(thinking: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "Order two things, trace a route, save me."}],
        tools=TOOLS,
        tool_choice="required",
        chat_template_kwargs={"enable_thinking": thinking},
    )


@pytest.mark.parametrize("thinking", [False], ids=["no_thinking"])
def test_forced_calls_with_refs_always_validate(engine, thinking):
    req = request(thinking)
    # the grammar forces the call; the tools' schemas in the prompt would only make each of
    # the 100 prefills 1,500 tokens long
    prompt = render_prompt(engine.tokenizer, req.model_copy(update={"tools": None}))
    spec = chat_spec(req, prompt_in_reasoning=thinking)
    ids = engine.tokenizer(prompt)["input_ids"]
    extra = {"thinking_token_budget": 8} if thinking else {}
    for seed in range(TRIES):
        params = SamplingParams(
            temperature=1.0, seed=seed, max_tokens=600, structured=spec, **extra
        )
        engine.add_request(str(seed), ids, params)
    done = {}
    while engine.has_unfinished():
        done |= {out.request_id: out for out in engine.step() if out.finished}
    called = set()
    for seed in range(TRIES):
        out = done[str(seed)].outputs[0]
        assert out.finish_reason == "stop", out.text
        message = ChoiceParser(prompt, req).whole(out.text)
        (call,) = message["tool_calls"]
        name = call["function"]["name"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
        called.add(name)
    # each tool's schema was exercised
    assert called == set(SCHEMAS)
