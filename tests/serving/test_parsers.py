"""ReasoningParser and ToolCallParser: whole outputs, every streaming split, and the two chained."""

import json
import re

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen35_ray.model.tiny.tokenizer import chat_template
from qwen35_ray.serving.parsers import ReasoningParser, ToolCallParser, prompt_ends_in_reasoning

WEATHER_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
TIME_CALL = (
    "<tool_call>\n<function=get_time>\n<parameter=zone>\nEurope/Paris\n</parameter>\n"
    "</function>\n</tool_call>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "configure",
            "parameters": {
                "type": "object",
                "properties": {
                    "count": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "scale": {"type": "number"},
                    "enabled": {"type": "boolean"},
                    "verbose": {"type": "boolean"},
                    "options": {"type": "object"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "zip": {"type": "string"},
                    "note": {"type": "string"},
                    "limit": {"type": ["integer", "null"]},
                    "label": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            },
        },
    },
]


def splits(text: str) -> list[list[str]]:
    """Every split into two chunks, then one chunk per character."""
    return [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]


def render(messages: list[dict], **kwargs) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.add_extension(loopcontrols)
    return env.from_string(chat_template()).render(messages=messages, **kwargs)


def stream_reasoning(prompt_in_reasoning: bool, chunks: list[str]):
    parser = ReasoningParser(prompt_in_reasoning)
    deltas = [parser.feed(chunk) for chunk in chunks] + [parser.flush()]
    # None, never "", so that an empty field is left out of the SSE delta
    assert all(value != "" for delta in deltas for value in delta)
    reasoning = "".join(r for r, _ in deltas if r) or None
    content = "".join(c for _, c in deltas if c) or None
    return reasoning, content


def stream_tool_calls(chunks: list[str], tools=TOOLS):
    parser = ToolCallParser(tools)
    events = [event for chunk in chunks for event in parser.feed(chunk)] + parser.flush()
    assert all(event[1] != "" for event in events if event[0] == "content")
    indices = [event[1] for event in events if event[0] == "tool_call"]
    assert indices == list(range(len(indices)))
    content = "".join(event[1] for event in events if event[0] == "content") or None
    return content, [event[2] for event in events if event[0] == "tool_call"]


def without_ids(calls: list[dict]) -> list[tuple[str, dict]]:
    for call in calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_prompt_ends_in_reasoning_follows_the_chat_template():
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_ends_in_reasoning(render(messages, add_generation_prompt=True))
    off = render(messages, add_generation_prompt=True, enable_thinking=False)
    assert not prompt_ends_in_reasoning(off)
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n")


REASONING_CASES = {
    "thinking on": (
        True,
        "Let me add.\n</think>\n\nThe answer is 4.",
        "Let me add.",
        "The answer is 4.",
    ),
    "thinking off": (False, "The answer is 4.", None, "The answer is 4."),
    "model opens think": (False, "<think>\nLet me add.\n</think>\n\n4", "Let me add.", "4"),
    "think repeated": (True, "<think>\nLet me add.\n</think>\n\n4", "Let me add.", "4"),
    "unclosed": (True, "Let me add.\n2 + 2 is\n", "Let me add.\n2 + 2 is\n", None),
    "empty reasoning": (True, "\n</think>\n\nHi", None, "Hi"),
    "no content": (True, "Done.\n</think>\n\n", "Done.", None),
    "multiline": (True, "a\n\nb\n</think>\n\nc\n\nd\n", "a\n\nb", "c\n\nd\n"),
    "tags in content": (
        True,
        "x</think>\n\nclose with </think> or <think>",
        "x",
        "close with </think> or <think>",
    ),
    "tags in plain answer": (False, "Use <think> tags.", None, "Use <think> tags."),
    "less-than": (True, "is a < b? <\n</think>\n\n<yes>", "is a < b? <", "<yes>"),
    "empty": (True, "", None, None),
}


@pytest.mark.parametrize("case", REASONING_CASES.values(), ids=REASONING_CASES.keys())
def test_reasoning_parse(case):
    prompt_in_reasoning, output, reasoning, content = case
    assert ReasoningParser(prompt_in_reasoning).parse(output) == (reasoning, content)


@pytest.mark.parametrize("case", REASONING_CASES.values(), ids=REASONING_CASES.keys())
def test_reasoning_stream_matches_parse_at_every_split(case):
    prompt_in_reasoning, output, reasoning, content = case
    for chunks in splits(output):
        assert stream_reasoning(prompt_in_reasoning, chunks) == (reasoning, content), chunks


def test_reasoning_is_sent_before_the_output_ends():
    parser = ReasoningParser(True)
    assert parser.feed("Let me") == ("Let me", None)
    assert parser.feed(" add.\n</thi") == (" add.", None)
    assert parser.feed("nk>\n\nThe answer") == (None, "The answer")
    assert parser.flush() == (None, None)


def test_one_call():
    content, calls = ToolCallParser(TOOLS).parse(WEATHER_CALL)
    assert content is None
    assert without_ids(calls) == [("get_weather", {"city": "Paris", "days": 3})]


def test_several_calls_and_content_before_them():
    text = f"I'll check both.\n\n{WEATHER_CALL}\n{TIME_CALL}\n"
    content, calls = ToolCallParser(TOOLS).parse(text)
    assert content == "I'll check both."
    assert without_ids(calls) == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_time", {"zone": "Europe/Paris"}),
    ]
    assert len({call["id"] for call in calls}) == 2


def call_text(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def test_arguments_are_typed_by_the_schema():
    text = call_text(
        "configure",
        count="42",
        ratio="2.5",
        scale="3",
        enabled="true",
        verbose="False",
        options='{"unit": "C", "depth": [1, 2]}',
        tags='["a", "b"]',
        zip="007",
        note="line one\nline two",
        limit="null",
        label="null",
        extra="[1, 2]",
        free="not json",
    )
    _, calls = ToolCallParser(TOOLS).parse(text)
    assert without_ids(calls) == [
        (
            "configure",
            {
                "count": 42,
                "ratio": 2.5,
                "scale": 3,
                "enabled": True,
                "verbose": False,
                "options": {"unit": "C", "depth": [1, 2]},
                "tags": ["a", "b"],
                "zip": "007",
                "note": "line one\nline two",
                "limit": None,
                "label": None,
                # parameters the schema does not know: JSON if it parses, else the text
                "extra": [1, 2],
                "free": "not json",
            },
        )
    ]


def test_values_that_do_not_fit_the_schema_are_kept_as_written():
    text = call_text("configure", count="many", enabled="yes", options="{broken", zip="12")
    _, calls = ToolCallParser(TOOLS).parse(text)
    assert without_ids(calls)[0][1] == {
        "count": "many",
        "enabled": "yes",
        "options": "{broken",
        "zip": "12",
    }


def test_only_one_newline_is_stripped_from_each_side_of_a_value():
    _, calls = ToolCallParser(TOOLS).parse(call_text("get_time", zone="\nUTC\n"))
    assert without_ids(calls) == [("get_time", {"zone": "\nUTC\n"})]


@pytest.mark.parametrize("tools", [None, []], ids=["no tools", "empty tools"])
def test_unknown_tools_get_best_effort_arguments(tools):
    _, calls = ToolCallParser(tools).parse(call_text("lookup", n="7", q="cats", flag="true"))
    assert without_ids(calls) == [("lookup", {"n": 7, "q": "cats", "flag": True})]


def test_call_ids_are_random_unless_seeded():
    ids = {ToolCallParser(TOOLS).parse(WEATHER_CALL)[1][0]["id"] for _ in range(20)}
    assert len(ids) == 20
    seeded = [ToolCallParser(TOOLS, seed=7).parse(WEATHER_CALL)[1][0]["id"] for _ in range(2)]
    assert seeded[0] == seeded[1]
    parser = ToolCallParser(TOOLS, seed=7)
    assert parser.parse(WEATHER_CALL)[1][0]["id"] != parser.parse(WEATHER_CALL)[1][0]["id"]


MALFORMED = {
    "missing </function>": (
        "<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n</parameter>\n</tool_call>"
    ),
    "unclosed <tool_call>": "Sure.\n<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n",
    "garbage inside": "<tool_call>\nget_time(zone='UTC')\n</tool_call>",
    "text between parameters": (
        "<tool_call>\n<function=get_time>\nzone is\n<parameter=zone>\nUTC\n</parameter>\n"
        "</function>\n</tool_call>"
    ),
    "missing </parameter>": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>"
    ),
    "empty function name": "<tool_call>\n<function=>\n</function>\n</tool_call>",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_blocks_come_back_as_content(text):
    assert ToolCallParser(TOOLS).parse(text) == (text, [])


def test_a_malformed_block_does_not_hide_the_valid_call_after_it():
    prose = "Write <tool_call> then the function."
    content, calls = ToolCallParser(TOOLS).parse(f"{prose}\n{WEATHER_CALL}")
    assert content == prose
    assert without_ids(calls) == [("get_weather", {"city": "Paris", "days": 3})]
    garbage = "<tool_call>\noops\n</tool_call>"
    content, calls = ToolCallParser(TOOLS).parse(f"{garbage}\n{TIME_CALL}")
    assert content == garbage
    assert without_ids(calls) == [("get_time", {"zone": "Europe/Paris"})]


TOOL_TEXTS = {
    "one call": WEATHER_CALL,
    "content and calls": f"I'll check both.\n\n{WEATHER_CALL}\n{TIME_CALL}\n",
    "content between calls": f"{WEATHER_CALL}\nAnd the time:\n{TIME_CALL}",
    "no calls": "if a < b and b <= c then <tool> is not <tool_call",
    "trailing whitespace": "Plain answer.\n\n",
    **MALFORMED,
    "malformed then valid": f"Write <tool_call> then the function.\n{WEATHER_CALL}",
}


@pytest.mark.parametrize("text", TOOL_TEXTS.values(), ids=TOOL_TEXTS.keys())
def test_tool_call_stream_matches_parse_at_every_split(text):
    content, calls = ToolCallParser(TOOLS).parse(text)
    expected = (content, without_ids(calls))
    for chunks in splits(text):
        streamed_content, streamed_calls = stream_tool_calls(chunks)
        assert (streamed_content, without_ids(streamed_calls)) == expected, chunks


def test_text_without_tags_passes_through_before_the_output_ends():
    parser = ToolCallParser(TOOLS)
    sent = [
        event for chunk in "x = a < b; y = c<d".split(" ") for event in parser.feed(chunk + " ")
    ]
    assert "".join(event[1] for event in sent) == "x = a < b; y = c<d"


def test_a_call_is_sent_when_its_block_closes():
    parser = ToolCallParser(TOOLS)
    head, tail = WEATHER_CALL.split("</function>")
    assert parser.feed("Checking.\n" + head) == [("content", "Checking.")]
    (event,) = parser.feed("</function>\n</tool_call>")
    assert event[:2] == ("tool_call", 0)
    assert without_ids([event[2]]) == [("get_weather", {"city": "Paris", "days": 3})]
    assert parser.flush() == []


def parse_chained(prompt_in_reasoning: bool, chunks: list[str]):
    """What the chat endpoint does: reasoning first, tool calls only in the content."""
    reasoning_parser, tool_parser = ReasoningParser(prompt_in_reasoning), ToolCallParser(TOOLS)
    reasoning, events = [], []
    for reasoning_delta, content_delta in [
        *(reasoning_parser.feed(chunk) for chunk in chunks),
        reasoning_parser.flush(),
    ]:
        reasoning.append(reasoning_delta or "")
        events += tool_parser.feed(content_delta or "")
    events += tool_parser.flush()
    content = "".join(event[1] for event in events if event[0] == "content") or None
    calls = without_ids([event[2] for event in events if event[0] == "tool_call"])
    return "".join(reasoning) or None, content, calls


def test_calls_inside_reasoning_are_ignored():
    output = f"Maybe {TIME_CALL} later.\n</think>\n\nLet me look.\n{WEATHER_CALL}"
    expected = (
        f"Maybe {TIME_CALL} later.",
        "Let me look.",
        [("get_weather", {"city": "Paris", "days": 3})],
    )
    for chunks in splits(output):
        assert parse_chained(True, chunks) == expected, chunks


def test_calls_written_by_the_chat_template_parse_back():
    arguments = {"city": "Paris", "days": 3}
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": arguments}},
                {
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"zone": "CET"}},
                },
            ],
        },
    ]
    rendered = render(messages, tools=TOOLS)
    assistant = rendered.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    assert parse_chained(False, [assistant]) == (
        None,
        "Checking.",
        [("get_weather", arguments), ("get_time", {"zone": "CET"})],
    )
