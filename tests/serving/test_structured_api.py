"""Structured outputs over real HTTP with the official `openai` client: response_format and
forced tool calls on a random-weight model, whose outputs are valid only thanks to the grammar.

Termination: schemas bound every string (maxLength) and array (maxItems) and JSON is compact,
so each grammar ends within a few dozen tokens. Thinking is switched off where an output is
validated: with it on, the grammar starts after `</think>`, which a random model rarely writes.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests
from json_schemas import SCHEMAS, WEATHER_ARGS
from serve_fixtures import tiny_app

MODEL = "qwen35-tiny"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
TIME_ARGS = {
    "type": "object",
    "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "verbose": {"type": "boolean"},
        "fields": {"type": "array", "items": {"enum": ["h", "m", "s"]}, "maxItems": 3},
    },
    "required": ["zone"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_ARGS}},
]
ARGS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 20}},
    "required": ["answer"],
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with tiny_app(tmp_path_factory.mktemp("tiny"), MODEL) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def chat(client, **kw):
    kw = {"model": MODEL, "messages": USER, "temperature": 1.0, "max_tokens": 150, **kw}
    kw["extra_body"] = {**NO_THINKING, **kw.get("extra_body", {})}
    return client.chat.completions.create(**kw)


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, ARGS[call.function.name])
    return args


def test_agent_round_trip(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = chat(client, tools=TOOLS, tool_choice=named, seed=1).choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather"
    check_call(call)
    messages = USER + [
        {"role": "assistant", "content": first.message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    final = chat(
        client, messages=messages, tools=TOOLS, response_format=json_format(ANSWER), seed=2
    ).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    jsonschema.validate(json.loads(final.message.content), ANSWER)


def test_required_calls_one_of_the_offered_tools(client):
    r = chat(client, tools=TOOLS, tool_choice="required", n=4, seed=3)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        check_call(call)


def test_forced_call_streams_as_a_tool_call_delta(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, reasons = [], []
    for ev in chat(client, tools=TOOLS, tool_choice=named, seed=4, stream=True):
        for c in ev.choices:
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    (call,) = calls
    assert call.function.name == "get_time" and reasons[-1] == "tool_calls"
    check_call(call)


def test_tool_choice_auto_and_none_leave_the_model_free(client):
    for choice in ("auto", "none"):
        r = chat(client, tools=TOOLS, tool_choice=choice, max_tokens=10, seed=5)
        r = r.choices[0]
        assert r.finish_reason == "length" and not r.message.tool_calls


def test_twenty_schemas_all_validate(client):
    def one(i):
        r = chat(client, response_format=json_format(SCHEMAS[i]), seed=100 + i).choices[0]
        return r.finish_reason, r.message.content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(len(SCHEMAS))))
    for schema, (reason, content) in zip(SCHEMAS, results):
        assert reason == "stop", content
        jsonschema.validate(json.loads(content), schema)


def test_json_schema_streaming_equals_non_streaming(client):
    kw = dict(response_format=json_format(WEATHER_ARGS), seed=6)
    whole = chat(client, **kw).choices[0].message.content
    parts = [c.delta.content or "" for ev in chat(client, stream=True, **kw) for c in ev.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), WEATHER_ARGS)


def test_json_object_and_completions(client):
    r = chat(client, response_format={"type": "json_object"}, n=4, seed=7, max_tokens=300)
    assert all(c.message.content.startswith("{") for c in r.choices)
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    done = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=150,
        seed=8,
        extra_body={"response_format": json_format(ANSWER)},
    ).choices[0]
    assert done.finish_reason == "stop"
    jsonschema.validate(json.loads(done.text), ANSWER)


def test_thinking_on_leaves_reasoning_free(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        response_format=json_format(ANSWER),
        temperature=0,
        max_tokens=8,
    ).choices[0]
    # the grammar waits for `</think>`: 8 free tokens of reasoning, cut by max_tokens
    assert r.finish_reason == "length" and getattr(r.message, "reasoning_content", None)


BAD = [
    ({"response_format": json_format({"type": "objectx"})}, "objectx", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema", None),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "absent"}}},
        "absent",
        None,
    ),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
        None,
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "integr"}}},
                    },
                }
            ],
            "tool_choice": "required",
        },
        "integr",
        None,
    ),
    ({"response_format": json_format({"type": "objectx"}), "stream": True}, "objectx", None),
]


@pytest.mark.parametrize(
    "extra, word, _",
    BAD,
    ids=[
        "invalid schema",
        "json_schema without schema",
        "absent tool",
        "format and forced call",
        "invalid tool parameters",
        "invalid schema streaming",
    ],
)
def test_bad_requests_are_400s(url, extra, word, _):
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, **extra}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and word in error["message"]
