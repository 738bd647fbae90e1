"""What the ingress refuses before any work starts, checked on the request models and helpers
alone (no Ray): every mistake is a 400 naming the field and what is allowed."""

import asyncio
import json

import pytest

from qwen35_ray.serving import limits
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.fanout import collect_all, start_all
from qwen35_ray.serving.openapi import request_body
from qwen35_ray.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from qwen35_ray.serving.request_body import parse_object, validate

VOCAB = 1000
TRUSTED = {"vocab_size": VOCAB, "trust_request_chat_template": True}
CONTEXT = {"vocab_size": VOCAB, "trust_request_chat_template": False}
USER = [{"role": "user", "content": "hi"}]


def chat(context=CONTEXT, **fields):
    return validate(ChatCompletionRequest, {"model": "m", "messages": USER, **fields}, context)


def refused(fn, *args, **kwargs) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        fn(*args, **kwargs)
    assert e.value.status == 400 and "Value error" not in e.value.message
    return e.value


CHAT_NULLABLE = [
    "stream",
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "seed",
    "tools",
    "tool_choice",
    "stream_options",
    "response_format",
    "user",
    "ignore_eos",
    "skip_special_tokens",
    "chat_template_kwargs",
    "thinking_token_budget",
    "parallel_tool_calls",
]


@pytest.mark.parametrize("field", CHAT_NULLABLE)
def test_null_means_the_default_in_chat(field):
    assert chat(**{field: None}).model_dump() == chat().model_dump()


@pytest.mark.parametrize("field", ["echo", "n", "logprobs", "max_tokens", "stream", "stop"])
def test_null_means_the_default_in_completions(field):
    body = {"model": "m", "prompt": "x"}
    with_null = validate(CompletionRequest, {**body, field: None}, CONTEXT)
    assert with_null.model_dump() == validate(CompletionRequest, body, CONTEXT).model_dump()
    assert with_null.max_tokens == 16


@pytest.mark.parametrize("seed", [limits.SEED_MIN, 0, limits.SEED_MAX])
def test_int64_seeds_pass(seed):
    assert chat(seed=seed).sampling(8, None, {})["seed"] == seed


@pytest.mark.parametrize("seed", [2**63, 2**64, 18446744073709551616, -(2**63) - 1])
def test_seeds_past_int64_are_refused(seed):
    e = refused(chat, seed=seed)
    assert e.param == "seed" and "922337203685477580" in e.message


def test_best_of_only_equal_to_n():
    assert chat(n=2, best_of=2).n == 2
    e = refused(chat, n=1, best_of=3)
    assert e.param == "best_of" and "equal to n" in e.message


@pytest.mark.parametrize(
    "fields,param,says",
    [
        ({"stop": ["x"] * (limits.MAX_STOP_STRINGS + 1)}, "stop", "at most 16"),
        ({"stop": "y" * (limits.MAX_STOP_LENGTH + 1)}, "stop", "1 to 256"),
        ({"stop": [""]}, "stop", "1 to 256"),
        ({"stop_token_ids": list(range(limits.MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids", "64"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"[0, {VOCAB})"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0", "greater than or equal to 0"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"logit_bias": {"12": 101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"hello": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", "outside the vocabulary"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty", "0.01"),
        ({"repetition_penalty": 11}, "repetition_penalty", "10"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
        ({"n": 17}, "n", "16"),
        ({"thinking_token_budget": -1}, "thinking_token_budget", "0"),
        ({"temperature": 2.5}, "temperature", "2"),
    ],
)
def test_out_of_range_fields_name_the_field_and_the_range(fields, param, says):
    e = refused(chat, **fields)
    assert e.param == param and says in e.message, e.message


def test_logit_bias_and_thinking_budget_reach_the_params_as_the_engine_reads_them():
    params = chat(logit_bias={"7": -100, "42": 2.5}, thinking_token_budget=32).sampling(8, None, {})
    assert params["logit_bias"] == {7: -100.0, 42: 2.5}
    assert params["thinking_token_budget"] == 32
    assert "logit_bias" not in chat().sampling(8, None, {})


def test_tool_and_message_counts_are_bounded():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert refused(chat, tools=[tool] * (limits.MAX_TOOLS + 1)).param == "tools"
    many = USER * (limits.MAX_MESSAGES + 1)
    e = refused(validate, ChatCompletionRequest, {"model": "m", "messages": many}, CONTEXT)
    assert e.param == "messages"


@pytest.mark.parametrize("kind", ["input_image", "image", "video", "input_audio"])
def test_media_parts_are_refused_naming_the_part(kind):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": kind}]}]
    e = refused(validate, ChatCompletionRequest, {"model": "m", "messages": messages}, CONTEXT)
    assert "messages[0].content[1].type" in e.message and "not supported" in e.message


@pytest.mark.parametrize("spec", [None, {}, {"url": ""}, {"url": 5}, "data:image/png;base64,"])
def test_an_image_url_part_needs_a_url(spec):
    part = {"type": "image_url", "image_url": spec}
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
    e = refused(validate, ChatCompletionRequest, {"model": "m", "messages": messages}, CONTEXT)
    assert "messages[0].content[1].image_url must be" in e.message
    # a well-formed one passes the request's checks (its image is read later, in media.py)
    part["image_url"] = {"url": "data:image/png;base64,AAAA"}
    validate(ChatCompletionRequest, {"model": "m", "messages": messages}, CONTEXT)


@pytest.mark.parametrize(
    "message",
    [
        {"content": "no role"},
        {"role": "user", "content": 5},
        {"role": "user", "content": ["bare string part"]},
        {"role": "assistant", "tool_calls": "x"},
        {"role": "assistant", "tool_calls": [{"function": "f"}]},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
    ],
)
def test_malformed_messages_are_refused_in_chat_and_tokenize(message):
    refused(validate, ChatCompletionRequest, {"model": "m", "messages": [message]}, CONTEXT)
    refused(validate, TokenizeRequest, {"messages": [message]}, CONTEXT)


def test_tokenize_needs_at_least_one_message():
    assert refused(validate, TokenizeRequest, {"messages": []}, CONTEXT).param == "messages"


def test_request_templates_need_the_operators_trust():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    for fields in (
        {"chat_template": template},
        {"chat_template_kwargs": {"chat_template": template}},
    ):
        e = refused(chat, **fields)
        assert "trust_request_chat_template" in e.message
        assert chat(TRUSTED, **fields)
    for name in ("tokenize", "messages", "tools", "add_generation_prompt"):
        e = refused(chat, TRUSTED, chat_template_kwargs={name: True})
        assert e.param == "chat_template_kwargs" and name in e.message


def test_template_kwargs_are_bounded_scalars():
    assert chat(chat_template_kwargs={"enable_thinking": False}).chat_template_kwargs
    refused(chat, chat_template_kwargs={"enable_thinking": {"nested": 1}})
    refused(chat, chat_template_kwargs={"x": "y" * (limits.MAX_TEMPLATE_KWARG_LENGTH + 1)})


def test_completion_prompts_are_bounded_and_in_the_vocabulary():
    many = {"model": "m", "prompt": ["a"] * (limits.MAX_PROMPTS + 1)}
    assert "at most 64 prompts" in refused(validate, CompletionRequest, many, CONTEXT).message
    e = refused(validate, CompletionRequest, {"model": "m", "prompt": [[1], [2, VOCAB]]}, CONTEXT)
    assert "prompt[1]" in e.message and e.param == "prompt"
    refused(validate, CompletionRequest, {"model": "m", "prompt": "x", "echo": True}, CONTEXT)
    refused(validate, DetokenizeRequest, {"tokens": [VOCAB]}, CONTEXT)


@pytest.mark.parametrize(
    "raw,says",
    [
        (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "messages[0].content"),
        (b'{"\\udc00": 1}', "surrogate"),
        (b"[" * 5000 + b"]" * 5000, "nests deeper"),
        (b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}", "nests deeper"),
        (b'{"temperature": NaN}', "NaN"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1]", "JSON object"),
    ],
)
def test_bodies_python_parses_but_nothing_should_use_are_refused(raw, says):
    e = refused(parse_object, raw)
    assert says in e.message
    json.dumps(e.body()).encode("utf-8")


def test_valid_unicode_passes():
    assert parse_object('{"a": "\\ud83d\\ude00 é"}'.encode()) == {"a": "\U0001f600 é"}


def test_openapi_bodies_have_no_dangling_refs():
    for model in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
        extra = request_body(model)
        text = json.dumps(extra)
        assert "$ref" not in text and "$defs" not in text
        schema = extra["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "object" and schema["properties"]
    chat_schema = request_body(ChatCompletionRequest)["requestBody"]["content"]
    tools = chat_schema["application/json"]["schema"]["properties"]["tools"]
    assert "function" in json.dumps(tools)


class FakeStream:
    """A stand-in for a Serve response generator: yields `items`, or fails first."""

    def __init__(self, items, fail=False):
        self.items, self.fail, self.cancelled = list(items), fail, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.fail:
            raise OpenAIError("refused by the replica")
        if self.cancelled or not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


STEP = {"outputs": [{"index": 0, "text": "a", "token_ids": [1], "logprobs": None,
                     "finish_reason": None}]}  # fmt: skip


def test_one_failing_start_cancels_the_started_siblings():
    streams = [FakeStream([STEP] * 5), FakeStream([], fail=True), FakeStream([STEP] * 5)]
    with pytest.raises(OpenAIError, match="refused"):
        asyncio.run(start_all(streams))
    assert streams[0].cancelled and streams[2].cancelled


def test_one_failing_collect_cancels_the_siblings():
    streams = [FakeStream([STEP] * 50), FakeStream([], fail=True)]
    with pytest.raises(OpenAIError):
        asyncio.run(collect_all(streams, 1))
    assert streams[0].cancelled
