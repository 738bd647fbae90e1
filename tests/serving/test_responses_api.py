"""POST /v1/responses over real HTTP on a local Ray cluster, driven by the official `openai`
client's `responses.create` and `responses.stream`, against the chat route on the same
conversations: one app for the module.

The tiny model writes random text, so outputs are checked against what the chat route gives
for the equivalent request (greedy, or with the same seed), and structured answers and forced
calls against their JSON schemas (the grammar makes them valid). Thinking is switched off
where an answer or a call must come within a few tokens.
"""

import json
import time

import jsonschema
import openai
import pytest
import requests
from http_helpers import totals
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from json_schemas import PERSON, WEATHER_ARGS
from responses_events import check_event_order
from schema_strategy import JSON, from_schema
from serve_fixtures import tiny_app

MODEL = "qwen35-tiny"
QUESTION = "What is the weather in Paris?"
USER = [{"role": "user", "content": QUESTION}]
TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER_ARGS, "strict": True}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}}
NO_THINKING = {"effort": "none"}
GREEDY = dict(temperature=0, max_output_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with tiny_app(tmp_path_factory.mktemp("tiny"), MODEL) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def chat_greedy(client, messages, thinking: bool, **kw):
    kwargs = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=12,
        extra_body={"ignore_eos": True, **kwargs},
        **kw,
    )


def raw_events(client, **kw) -> list[dict]:
    """A create(stream=True)'s events as dicts, checked for the documented order."""
    events = [e.model_dump() for e in client.responses.create(model=MODEL, stream=True, **kw)]
    check_event_order(events)
    return events


def test_plain_text_equals_the_chat_route_streamed_or_not(client):
    r = client.responses.create(model=MODEL, input=QUESTION, reasoning=NO_THINKING, **GREEDY)
    c = chat_greedy(client, USER, thinking=False)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (message,) = r.output
    assert message.type == "message" and message.status == "incomplete"
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.usage.output_tokens == c.usage.completion_tokens == 12
    assert r.usage.total_tokens == c.usage.total_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    events = raw_events(client, input=QUESTION, reasoning=NO_THINKING, **GREEDY)
    assert events[-1]["type"] == "response.incomplete"
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == r.output_text
    usage = events[-1]["response"]["usage"]
    for key in ("input_tokens", "output_tokens", "total_tokens", "output_tokens_details"):
        assert usage[key] == r.usage.model_dump()[key]
    # the same prompt again: its full blocks came from the prefix cache
    assert usage["input_tokens_details"]["cached_tokens"] > 0


def test_reasoning_on_by_default_as_reasoning_items(client):
    r = client.responses.create(model=MODEL, input=QUESTION, **GREEDY)
    c = chat_greedy(client, USER, thinking=True).choices[0].message
    reasoning = r.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary == []
    # the prompt opened <think>: the output starts as reasoning, as the chat route's does
    assert reasoning.content[0].text == c.reasoning_content
    assert r.output_text == (c.content or "")
    counted = r.usage.output_tokens_details.reasoning_tokens
    assert 0 < counted <= r.usage.output_tokens
    if len(r.output) == 1:
        assert counted == r.usage.output_tokens
    events = raw_events(client, input=QUESTION, **GREEDY)
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == reasoning.content[0].text


def forced_call(client, seed: int, **kw):
    r = client.responses.create(
        model=MODEL,
        input=QUESTION,
        tools=[TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=1.0,
        max_output_tokens=200,
        extra_body={"seed": seed, **kw.pop("extra_body", {})},
        **kw,
    )
    assert r.status == "completed"
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    return r


def test_a_forced_call_validates_created_or_streamed(client):
    r = forced_call(client, seed=1, reasoning=NO_THINKING)
    assert [i.type for i in r.output] == ["function_call"]
    with client.responses.stream(
        model=MODEL,
        input=QUESTION,
        tools=[TOOL],
        tool_choice="required",
        reasoning=NO_THINKING,
        temperature=1.0,
        max_output_tokens=200,
        extra_body={"seed": 2},
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (call,) = final.output
    # the SDK parses the arguments of a strict tool
    jsonschema.validate(call.parsed_arguments, WEATHER_ARGS)


@pytest.mark.parametrize("thinking", [False, True], ids=["no thinking", "thinking"])
def test_a_second_turn_with_the_call_output_equals_the_chat_route(client, url, thinking):
    """The first turn's output items go back as input with a function_call_output; the
    answer, token for token, and the prompt's size are the chat route's for the same
    conversation (assistant tool_calls, reasoning_content, a tool message)."""
    reasoning = None if thinking else NO_THINKING
    # with thinking on, the engine closes </think> after 16 tokens so the call follows
    budget = {"extra_body": {"thinking_token_budget": 16}} if thinking else {}
    first = forced_call(client, seed=3, reasoning=reasoning, **budget)
    assert [i.type for i in first.output][:1] == (["reasoning"] if thinking else ["function_call"])
    call = first.output[-1]
    output = '{"temperature_c": 21}'
    items = [i.model_dump(exclude_none=True) for i in first.output]
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": QUESTION},
            *items,
            {"type": "function_call_output", "call_id": call.call_id, "output": output},
        ],
        tools=[TOOL],
        reasoning=reasoning,
        **GREEDY,
    )
    assistant = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
        ],
    }
    if thinking:
        assistant["reasoning_content"] = first.output[0].content[0].text
    messages = [*USER, assistant, {"role": "tool", "tool_call_id": call.call_id, "content": output}]
    c = chat_greedy(client, messages, thinking, tools=[CHAT_TOOL])
    message = c.choices[0].message
    assert second.output_text == (message.content or "")
    if thinking:
        assert second.output[0].content[0].text == message.reasoning_content
    assert second.usage.input_tokens == c.usage.prompt_tokens
    assert second.usage.output_tokens == c.usage.completion_tokens
    kwargs = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    body = {"messages": messages, "tools": [CHAT_TOOL], **kwargs}
    ids = requests.post(url + "/tokenize", json=body, timeout=30).json()["tokens"]
    assert len(ids) == second.usage.input_tokens
    prompt = requests.post(url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert f"<tool_response>\n{output}\n</tool_response>" in prompt


def test_a_json_schema_answer_validates_created_or_streamed(client):
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    kw = dict(
        model=MODEL,
        input="Describe a person.",
        text=text,
        reasoning=NO_THINKING,
        temperature=1.0,
        max_output_tokens=150,
        extra_body={"seed": 4},
    )
    r = client.responses.create(**kw)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert final.output_text == r.output_text


def test_sdk_defaults_work_and_nothing_is_stored(client, url):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert r.model == MODEL and r.object == "response" and r.id.startswith("resp_")
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "store": True}
    out = requests.post(url + "/v1/responses", json=body, timeout=60)
    assert out.status_code == 200 and out.json()["store"] is False
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL, input="Hi", store=True, previous_response_id=out.json()["id"]
        )
    assert e.value.body["param"] == "previous_response_id"


def req(**kw) -> dict:
    return {"model": MODEL, "input": QUESTION, "max_output_tokens": 4, **kw}


IMAGE = {"type": "input_image", "image_url": "http://127.0.0.1/x.png"}
BAD = [
    (
        "stored response",
        req(store=True, previous_response_id="resp_1"),
        400,
        "previous_response_id",
    ),
    ("built-in tool", req(tools=[{"type": "web_search"}]), 400, "tools"),
    ("item reference", req(input=[{"type": "item_reference", "id": "m"}]), 400, "input[0].type"),
    (
        "image from a host not allowed",
        req(input=[{"role": "user", "content": [IMAGE]}]),
        400,
        "input[0].content[0].image_url",
    ),
    ("background", req(background=True), 400, "background"),
    ("max_output_tokens past the context", req(max_output_tokens=10**6), 400, "max_output_tokens"),
    ("prompt past the context", req(input="word " * 3000), 400, "input"),
    ("no user message", req(input=[{"role": "system", "content": "x"}]), 400, "input"),
    ("unknown model", req(model="gpt-9"), 404, "model"),
    ("not json", b"{nope", 400, None),
]


@pytest.mark.parametrize("name, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_error_objects(url, name, body, status, param):
    if isinstance(body, bytes):
        r = requests.post(url + "/v1/responses", data=body, timeout=60)
    else:
        r = requests.post(url + "/v1/responses", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["param"] == param, error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_fuzzed_bodies_never_get_a_5xx(url):
    """Bodies from the route's schema in /openapi.json, some with a field replaced by any
    JSON: each is answered, and every refusal is an OpenAI error object."""
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    schema = spec["paths"]["/v1/responses"]["post"]["requestBody"]["content"]
    schema = schema["application/json"]["schema"]
    session, failures, sent = requests.Session(), [], []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=from_schema(schema), key=st.text(max_size=12), junk=JSON, mutate=st.booleans())
    def one(body, key, junk, mutate):
        body["model"] = MODEL
        if mutate:
            body[sorted(body)[sum(map(ord, key)) % len(body)]] = junk
        # generation stays short: the fuzz is about what the route accepts
        if not isinstance(body.get("max_output_tokens"), int) or body["max_output_tokens"] > 4:
            body["max_output_tokens"] = 4
        r = session.post(url + "/v1/responses", data=json.dumps(body), timeout=60)
        sent.append(r.status_code)
        error = r.json().get("error") if r.status_code >= 400 else {"code": r.status_code}
        if r.status_code >= 500 or error.get("code") != r.status_code:
            failures.append((body, r.status_code, r.text[:300]))

    one()
    assert len(sent) == 150 and 200 in sent and 400 in sent
    assert not failures, failures[:3]


def metrics(url: str) -> dict:
    return totals(url)


def test_a_client_leaving_a_stream_aborts_its_request(url):
    before = metrics(url)["qwen35_ray_requests_aborted_total"]
    body = req(max_output_tokens=1000, stream=True, ignore_eos=True)
    with requests.post(url + "/v1/responses", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
    deadline = time.time() + 30
    while time.time() < deadline:
        m = metrics(url)
        if (
            m["qwen35_ray_requests_aborted_total"] > before
            and m["qwen35_ray:num_requests_running"] == 0
            and m["qwen35_ray_state_slots_free"] == m["qwen35_ray_state_slots_total"]
        ):
            return
        time.sleep(0.2)
    pytest.fail(f"request not aborted after the client left: {metrics(url)}")
