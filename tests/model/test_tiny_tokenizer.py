import json
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer

from qwen35_ray.model.tiny.tokenizer import SPECIAL_TOKENS, chat_template, write_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REAL_TEMPLATE = SHARED_DATA / "qwen35" / "chat_template.jinja"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search documents; returns <= 10 hits & their scores.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "range": {
                            "type": "object",
                            "properties": {"from": {"type": "integer"}, "to": {"type": "integer"}},
                        },
                    },
                },
            },
            "required": ["query"],
        },
    },
}


def user(content):
    return {"role": "user", "content": content}


def assistant(content, reasoning=None, calls=None):
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    return message if reasoning is None else {**message, "reasoning_content": reasoning}


def tool(content):
    return {"role": "tool", "content": content}


def system(content):
    return {"role": "system", "content": content}


CALL_WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "P"}}}
SEARCH_ARGS = {"query": "línea 1\nline 2", "filters": {"tags": ["a", "ü"]}, "k": 3, "x": None}
CALL_SEARCH = {"function": {"name": "search", "arguments": SEARCH_ARGS}}
# Some clients send the function fields directly on the call.
CALL_FLAT = {"name": "get_weather", "arguments": {"city": "Tokyo", "unit": ["c"], "ok": True}}

USER = user("What is the weather in Paris?")
SYSTEM = system("  You are a helpful assistant.\n")
TOOL_TURN = [USER, assistant("", "Need data.", [CALL_WEATHER]), tool('{"temp": 21}')]
IMAGES = [
    {"type": "image", "image": "a.png"},
    {"type": "image_url", "image_url": {"url": "http://x/b.png"}},
    {"type": "text", "text": "Compare these with"},
    {"type": "video", "video": "c.mp4"},
]
GEN = {"add_generation_prompt": True}

CONVERSATIONS = {
    "single_user": ([USER], GEN),
    "single_user_no_generation_prompt": ([USER], {}),
    "system_and_user": ([SYSTEM, USER], GEN),
    "empty_system": ([system(""), USER], GEN),
    "multi_turn_thinking_off": (
        [USER, assistant("Sunny."), user("And Rome?")],
        {**GEN, "enable_thinking": False},
    ),
    "thinking_on_explicit": ([SYSTEM, USER], {**GEN, "enable_thinking": True}),
    "reasoning_before_and_after_last_query": (
        [USER, assistant("Sunny.", "Old."), user("Rome?"), assistant("Rainy.", "\n New. \n")],
        {},
    ),
    "reasoning_alias_key": ([USER, {"role": "assistant", "content": "A.", "reasoning": "R."}], GEN),
    "inline_think_in_content": (
        [
            USER,
            assistant("<think>\nEarlier.\n</think>\n\nSunny."),
            user("Sure?"),
            assistant("<think>\nCheck again.\n</think>\n\nYes."),
        ],
        GEN,
    ),
    "tools_without_system": ([USER], {**GEN, "tools": [WEATHER, SEARCH]}),
    "tools_with_system": ([SYSTEM, USER], {"tools": [WEATHER, SEARCH]}),
    "tools_with_blank_system": ([system(" "), USER], {"tools": [SEARCH]}),
    "one_tool_response_then_answer": (
        [*TOOL_TURN, assistant("21 degrees.", "Got it.")],
        {**GEN, "tools": [WEATHER]},
    ),
    "several_calls_and_responses": (
        [
            USER,
            assistant("Let me check both.", calls=[CALL_WEATHER, CALL_SEARCH, CALL_FLAT]),
            tool("sunny"),
            tool([{"type": "text", "text": "3 hits"}]),
            tool("rain"),
            assistant(None, calls=[CALL_FLAT]),
            tool("cloudy"),
        ],
        {**GEN, "tools": [WEATHER, SEARCH], "enable_thinking": False},
    ),
    "tool_output_sent_as_user_turn": (
        [*TOOL_TURN[:2], user("<tool_response>\n21\n</tool_response>"), assistant("W.", "Kept.")],
        {},
    ),
    # The real template opens no user turn for a tool result that starts the conversation.
    "leading_tool_message": ([tool("orphan"), USER], {}),
    "images_and_videos": (
        [
            SYSTEM,
            user(IMAGES),
            assistant([{"type": "text", "text": "They match."}]),
            user([{"type": "image"}, {"type": "text", "text": "and this?"}]),
        ],
        GEN,
    ),
    "numbered_vision_ids": (
        [user([{"type": "image"}, {"type": "video"}, {"type": "image"}])],
        {**GEN, "add_vision_id": True},
    ),
}

# Inputs the real template rejects; ours must reject them too.
INVALID = {
    "no_user_query": ([SYSTEM, assistant("Hi.")], {}),
    "only_tool_output_from_user": ([user("<tool_response>x</tool_response>")], {}),
    "system_not_first": ([USER, SYSTEM], {}),
    "unknown_role": ([USER, {"role": "critic", "content": "Bad."}], {}),
    "image_in_system": ([system([{"type": "image"}]), USER], {}),
    "video_in_system": ([system([{"type": "video"}]), USER], {"tools": [SEARCH]}),
    "mapping_content": ([user({"text": "hi"})], {}),
    "unknown_content_part": ([user([{"type": "audio", "audio": "a.wav"}])], {}),
    # The serving layer must json.loads string arguments first, as vLLM does.
    "arguments_as_json_string": (
        [USER, assistant("", calls=[{"function": {"name": "f", "arguments": '{"a": 1}'}}])],
        {},
    ),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    return out_dir, write_tokenizer(out_dir)


@pytest.fixture(scope="module")
def tokenizer(written):
    return AutoTokenizer.from_pretrained(written[0])


@pytest.fixture(scope="module")
def real_template():
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"reference data folder {SHARED_DATA} is absent; check out shared/ beside the repo"
        )
    assert REAL_TEMPLATE.is_file(), f"{REAL_TEMPLATE} is missing from the reference data"
    return REAL_TEMPLATE.read_text(encoding="utf-8")


def render(tokenizer, template, messages, kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def test_special_tokens_are_single_ids_right_after_the_base_vocab(written, tokenizer):
    _, vocab_size = written
    base = vocab_size - len(SPECIAL_TOKENS)
    assert len(tokenizer) == vocab_size <= 8192
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [base + offset], token
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.chat_template == chat_template()


def test_think_and_tool_tags_survive_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|><think>a</think><tool_call>b</tool_call><|im_end|>")
    assert (
        tokenizer.decode(ids, skip_special_tokens=True)
        == "<think>a</think><tool_call>b</tool_call>"
    )


def test_common_words_are_single_tokens(tokenizer):
    for word in [" the", " and", " question", " weather", "The", " function", " return"]:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        'def f(x: int) -> str:\n\treturn f"{x!r:>8}"  # done\n',
        "日本語のテキストと中文混合，한국어도。",
        "emoji 🤗👩‍👩‍👧‍👦 and flags 🇫🇷, e\u0301 vs \u00e9",
        "   leading and trailing spaces   \n\n\n  \t\r\nmixed\u00a0nbsp\u200b",
        "<|im_start|>user\nhi<|im_end|>\n<think>\n</think>",
    ],
)
def test_text_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_two_writes_are_byte_identical(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert write_tokenizer(first) == write_tokenizer(second)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    config = json.loads((first / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == chat_template()


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_template_renders_like_the_real_one(tokenizer, real_template, name):
    messages, kwargs = CONVERSATIONS[name]
    expected = render(tokenizer, real_template, messages, kwargs)
    assert render(tokenizer, chat_template(), messages, kwargs) == expected


@pytest.mark.parametrize("name", INVALID)
def test_template_rejects_what_the_real_one_rejects(tokenizer, real_template, name):
    messages, kwargs = INVALID[name]
    with pytest.raises(Exception) as real_error:
        render(tokenizer, real_template, messages, kwargs)
    with pytest.raises(Exception) as our_error:
        render(tokenizer, chat_template(), messages, kwargs)
    assert str(our_error.value) == str(real_error.value)


def test_json_string_arguments_render_once_parsed(tokenizer, real_template):
    call = {"function": {"name": "f", "arguments": '{"a": 1, "b": {"c": [2]}}'}}
    parsed = {"function": {"name": "f", "arguments": json.loads(call["function"]["arguments"])}}
    messages = [USER, assistant("", calls=[parsed])]
    expected = render(tokenizer, real_template, messages, {})
    assert render(tokenizer, chat_template(), messages, {}) == expected


@pytest.mark.parametrize("trim", [False, True])
def test_template_ignores_environment_whitespace_settings(tokenizer, trim):
    # Engines that render with their own jinja2 environment must get the same prompt.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    template = env.from_string(chat_template())
    for name, (messages, kwargs) in CONVERSATIONS.items():
        if name == "reasoning_alias_key":
            # transformers copies `reasoning` into `reasoning_content`; a bare environment does not.
            continue
        kwargs = {"add_generation_prompt": False, "tools": None, **kwargs}
        expected = render(tokenizer, chat_template(), messages, kwargs)
        assert template.render(messages=messages, **kwargs) == expected
