"""/v1/responses without Ray: Responses input rendered as its chat equivalent by the tiny
model's template, what is refused and how it is named, and the events and response object
built from replica steps, checked against the `openai` SDK's own types and stream
accumulator. The HTTP tests are in test_responses_api.py."""

import asyncio
import json

import pydantic
import pytest
import transformers
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from responses_events import check_event_order

from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving.chat import render_prompt
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.protocol import ChatCompletionRequest
from qwen35_ray.serving.request_body import validate
from qwen35_ray.serving.responses import chat_body
from qwen35_ray.serving.responses_protocol import ResponsesRequest
from qwen35_ray.serving.responses_stream import ResponseBuilder, event_stream

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_model("qwen35-tiny", weights=False))


def responses(**body) -> ResponsesRequest:
    return validate(ResponsesRequest, {"model": "m", **body}, {})


def chat(**body) -> ChatCompletionRequest:
    return validate(ChatCompletionRequest, {"model": "m", **body}, {})


def test_a_tool_conversation_renders_as_its_chat_equivalent(tokenizer):
    """Instructions and a developer message make the system message; a reasoning item and a
    function call after an assistant message make one assistant turn with reasoning_content
    and tool_calls; a function_call_output is a tool message."""
    req = responses(
        instructions="Be brief.",
        tools=[TOOL],
        input=[
            {"role": "developer", "content": "Use tools."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Paris?"}],
            },
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "Call the tool."}],
                "encrypted_content": None,
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
        ],
    )
    equivalent = chat(
        tools=[CHAT_TOOL],
        messages=[
            {"role": "system", "content": "Be brief.\n\nUse tools."},
            {"role": "user", "content": "Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "Call the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ],
    )
    prompt = render_prompt(tokenizer, chat(**chat_body(req)))
    assert prompt == render_prompt(tokenizer, equivalent)
    assert "Call the tool." in prompt and "<tool_response>" in prompt


def test_string_input_and_reasoning_effort(tokenizer):
    plain = chat_body(responses(input="Hi"))
    assert plain["messages"] == [{"role": "user", "content": "Hi"}]
    assert "chat_template_kwargs" not in plain
    off = chat_body(responses(input="Hi", reasoning={"effort": "none"}))
    assert off["chat_template_kwargs"] == {"enable_thinking": False}
    assert render_prompt(tokenizer, chat(**off)).endswith("<think>\n\n</think>\n\n")
    on = chat_body(responses(input="Hi", reasoning={"effort": "low"}))
    assert render_prompt(tokenizer, chat(**on)).endswith("<think>\n")
    with pytest.raises(OpenAIError) as e:
        chat_body(
            responses(
                input="Hi",
                reasoning={"effort": "high"},
                chat_template_kwargs={"enable_thinking": False},
            )
        )
    assert e.value.param == "reasoning.effort"


IMAGE = {"type": "input_image", "image_url": "http://127.0.0.1/x.png"}
BAD_INPUT = [
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    (
        [{"role": "assistant", "content": [{"type": "output_text", "text": "x"}, IMAGE]}],
        "input[0].content[1].type",
    ),
    (
        [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}],
        "input[0].content[0].image_url",
    ),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    (["hello"], "input[0]"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "input[1]"),
    (
        [
            {"role": "user", "content": "x"},
            {"type": "function_call", "name": "f", "arguments": "[1"},
        ],
        "input[1].arguments",
    ),
    (
        [{"type": "function_call_output", "call_id": "c", "output": [IMAGE]}],
        "input[0].output[0].type",
    ),
    ([{"role": "user", "content": {"text": "x"}}], "input[0].content"),
]


def test_input_images_become_the_chat_routes_image_url_parts():
    content = [
        {"type": "input_text", "text": "What is it?"},
        IMAGE,
        {"type": "input_text", "text": "!"},
    ]
    (message,) = chat_body(responses(input=[{"role": "user", "content": content}]))["messages"]
    assert message == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": IMAGE["image_url"]}},
            {"type": "text", "text": "!"},
        ],
    }
    # without images a user message stays one string
    (plain,) = chat_body(responses(input=[{"role": "user", "content": content[:1]}]))["messages"]
    assert plain == {"role": "user", "content": "What is it?"}


@pytest.mark.parametrize("items, param", BAD_INPUT, ids=[p for _, p in BAD_INPUT])
def test_a_bad_input_item_is_named(items, param):
    with pytest.raises(OpenAIError) as e:
        chat_body(responses(input=items))
    assert e.value.status == 400 and e.value.param == param, e.value.message


REFUSED = [
    ({"previous_response_id": "resp_1", "store": True}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"tools": [TOOL, {"type": "web_search"}]}, "tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "absent"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    (
        {"tools": [TOOL], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
        "text",
    ),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"tools": [{**TOOL, "parameters": {"type": "object", "maxLength": 1.5}}]}, "tools.0"),
]


@pytest.mark.parametrize("fields, param", REFUSED, ids=[p for _, p in REFUSED])
def test_what_cannot_be_served_is_refused_by_name(fields, param):
    with pytest.raises(OpenAIError) as e:
        responses(input="Hi", **fields)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_what_is_only_a_hint_is_accepted():
    req = responses(
        input="Hi",
        store=True,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "medium", "summary": "auto"},
        text={"verbosity": "low"},
        metadata={"k": "v"},
        service_tier="auto",
        prompt_cache_key="x",
        truncation="disabled",
        top_logprobs=0,
        previous_response_id=None,
    )
    assert chat(**chat_body(req)).messages == [{"role": "user", "content": "Hi"}]


def steps(*deltas) -> list[dict]:
    """Replica steps: (text, token ids, finish reason or None)."""
    return [
        {
            "outputs": [
                {"index": 0, "text": t, "token_ids": ids, "logprobs": None, "finish_reason": f}
            ],
            "num_cached_tokens": 3,
        }
        for t, ids, f in deltas
    ]


def run(tokenizer, req, replica_steps):
    """The builder over steps: its events (each valid as the SDK's event type) and the final
    response, which the SDK's stream accumulator rebuilds too."""
    c = chat(**chat_body(req))
    prompt = render_prompt(tokenizer, c)
    builder = ResponseBuilder(req, c, prompt, 40, {"temperature": 0.5}, "m", tokenizer)
    events = builder.start()
    for step in replica_steps:
        events += builder.feed(step)
    events += builder.finish()
    state = ResponseStreamState(input_tools=[TOOL], text_format=omit)
    for e in events:
        EVENT.validate_python(e)
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=e))
    final = builder.response()
    Response.model_validate(final)
    check_event_order(events)
    assert events[-1]["response"]["output"] == final["output"]
    return events, final, state


def test_reasoning_text_and_a_call_stream_as_the_sdk_expects(tokenizer):
    end = tokenizer.convert_tokens_to_ids("</think>")
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    events, final, state = run(
        tokenizer,
        responses(input="Paris?", tools=[TOOL]),
        steps(
            ("Let me", [11, 12], None),
            (" look.\n</think>\n\n", [13, end], None),
            ("It is", [14, 15], None),
            (" sunny.\n\n" + call, [16, 17, 18], None),
            ("</function>\n</tool_call>", [19], "stop"),
        ),
    )
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call"]
    reasoning, message, fc = final["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me look."}]
    assert message["content"][0]["text"] == "It is sunny."
    assert fc["name"] == "get_weather" and fc["call_id"].startswith("call_")
    assert fc["arguments"] == '{"city": "Paris"}' and fc["status"] == "completed"
    assert final["status"] == "completed" and final["store"] is False
    assert final["usage"] == {
        "input_tokens": 40,
        "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
        "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 4},
        "total_tokens": 50,
    }
    parsed = state._completed_response
    assert parsed.output_text == "It is sunny."
    assert parsed.output[2].parsed_arguments == {"city": "Paris"}


def test_a_cut_output_is_an_incomplete_response(tokenizer):
    events, final, _ = run(
        tokenizer,
        responses(input="Hi", reasoning={"effort": "none"}, parallel_tool_calls=False),
        steps(("Hello", [5], None), (" there", [6], "length")),
    )
    assert events[-1]["type"] == "response.incomplete"
    assert final["status"] == "incomplete" and final["completed_at"] is None
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = final["output"]
    assert message["status"] == "incomplete" and message["content"][0]["text"] == "Hello there"
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 0


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer):
    def block(city):
        body = f"<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n</function>"
        return f"<tool_call>\n{body}\n</tool_call>"

    req = responses(input="Hi", tools=[TOOL], reasoning={"effort": "none"})
    both = steps((block("Paris") + "\n" + block("Rome"), [5, 6], "stop"))
    _, final, _ = run(tokenizer, req, both)
    assert [json_city(i) for i in final["output"]] == ["Paris", "Rome"]
    one = req.model_copy(update={"parallel_tool_calls": False})
    _, final, _ = run(tokenizer, one, both)
    assert [json_city(i) for i in final["output"]] == ["Paris"]


def json_city(item: dict) -> str:
    return json.loads(item["arguments"])["city"]


def test_a_request_failing_midway_ends_its_stream_with_response_failed(tokenizer):
    req = responses(input="Hi", reasoning={"effort": "none"}, stream=True)
    c = chat(**chat_body(req))
    builder = ResponseBuilder(req, c, render_prompt(tokenizer, c), 9, {}, "m", tokenizer)

    async def replica():
        yield steps(("Hello", [5], None))[0]
        raise OpenAIError("the replica serving this request failed; retry the request", 503)

    async def read():
        return [chunk async for chunk in event_stream(builder, replica()).body_iterator]

    blocks = "".join(asyncio.run(read())).strip().split("\n\n")
    events = [json.loads(b.split("\ndata: ", 1)[1]) for b in blocks]
    assert [b.split("\n", 1)[0] for b in blocks] == [f"event: {e['type']}" for e in events]
    assert [e["type"] for e in events[-4:]] == [
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for e in events:
        EVENT.validate_python(e)
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=e))
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "retry" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "Hello"
    assert failed["output"][0]["status"] == "incomplete"
