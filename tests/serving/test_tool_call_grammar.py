"""The grammar of a forced tool call accepts what the chat template and the parser agree on,
and refuses a call the parser would read as invalid arguments."""

import json

import jsonschema
import pydantic
import pytest
import transformers
from json_schemas import LEGACY_ARGS, ORDER_ARGS, WEATHER_ARGS

from qwen35_ray.engine.structured import StructuredOutputs
from qwen35_ray.serving.chat import ChoiceParser
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.protocol import ChatCompletionRequest
from qwen35_ray.serving.structured import chat_spec

PARAMS = WEATHER_ARGS
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]
CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Jose\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from qwen35_ray.model.tiny.tokenizer import write_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return transformers.AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def outputs(tokenizer):
    return StructuredOutputs(tokenizer, 1216, [tokenizer.convert_tokens_to_ids("<|im_end|>")])


def request(choice="required") -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice=choice
    )


def follows(outputs, tokenizer, spec, text) -> bool:
    g = outputs.grammar(spec)
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return all(g.accept(t) for t in ids) and g.is_terminated


@pytest.mark.parametrize("thinking", [False, True])
def test_the_template_layout_is_accepted_and_parses_back(outputs, tokenizer, thinking):
    req = request({"type": "function", "function": {"name": "get_weather"}})
    spec = chat_spec(req, prompt_in_reasoning=thinking)
    text = ("Free thoughts { <tool_call>\n</think>\n\n" if thinking else "") + CALL
    assert follows(outputs, tokenizer, spec, text)
    prompt = "<think>\n" if thinking else "<think>\n\n</think>\n\n"
    message = ChoiceParser(prompt, req).whole(text)
    (call,) = message["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "San Jose", "days": 3}


@pytest.mark.parametrize(
    "bad",
    [
        CALL.replace("<parameter=days>\n3\n</parameter>\n", ""),  # a required one missing
        CALL.replace("\n3\n", "\n9\n"),  # out of bounds
        CALL.replace("San Jose", "A very long city name"),  # over maxLength
        CALL.replace("get_weather", "get_time"),  # not offered
        CALL.replace(
            "</parameter>\n<parameter=days>",
            "</parameter>\n<parameter=units>\nkelvin\n</parameter>\n<parameter=days>",
        ),  # out of enum (and order)
        "Sure! " + CALL,  # text before the call
    ],
)
def test_calls_the_parser_would_reject_are_refused(outputs, tokenizer, bad):
    assert not follows(outputs, tokenizer, chat_spec(request(), False), bad)


def forced(name: str, parameters: dict, thinking=False) -> tuple[ChatCompletionRequest, dict]:
    tools = [{"type": "function", "function": {"name": name, "parameters": parameters}}]
    req = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="required"
    )
    return req, chat_spec(req, thinking)


def order_call(note: str, city="Rome") -> str:
    return (
        "<tool_call>\n<function=place_order>\n"
        '<parameter=items>\n[{"sku": "ab", "qty": 2}]\n</parameter>\n'
        '<parameter=ship_to>\n{"street": "Main", "city": "Oslo"}\n</parameter>\n'
        "<parameter=bill_to>\nnull\n</parameter>\n"
        f"<parameter=city>\n{city}\n</parameter>\n"
        f'<parameter=note>\n{{"text": "{note}"}}\n</parameter>\n'
        "</function>\n</tool_call>"
    )


def test_refs_into_defs_are_followed_and_typed_alike_by_the_parser(outputs, tokenizer):
    req, spec = forced("place_order", ORDER_ARGS)
    text = order_call("hi")
    assert follows(outputs, tokenizer, spec, text)
    (call,) = ChoiceParser("<think>\n\n</think>\n\n", req).whole(text)["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    # a ref to an object is JSON, a ref to a string is raw text
    assert arguments["ship_to"] == {"street": "Main", "city": "Oslo"}
    assert arguments["city"] == "Rome"
    jsonschema.validate(arguments, ORDER_ARGS)


@pytest.mark.parametrize("bad", ["a\tb", "a\x01", 'a"', "a\\"])
def test_json_strings_in_a_call_hold_no_raw_control_characters(outputs, tokenizer, bad):
    """A length-bounded string inside a JSON parameter: xgrammar's own grammar lets control
    characters through; the call's grammar does not. Quotes and backslashes cannot be
    written raw either (the JSON would not parse)."""
    _, spec = forced("place_order", ORDER_ARGS)
    assert follows(outputs, tokenizer, spec, order_call("ab"))
    assert not follows(outputs, tokenizer, spec, order_call(bad))


def test_raw_string_parameters_keep_newlines_and_tabs(outputs, tokenizer):
    params = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 4096}}}
    _, spec = forced("run", params)
    text = "<tool_call>\n<function=run>\n<parameter=code>\nif x:\n\ty()\n</parameter>\n"
    assert follows(outputs, tokenizer, spec, text + "</function>\n</tool_call>")


def test_definitions_and_refs_between_defs_are_followed(outputs, tokenizer):
    _, spec = forced("trace_route", LEGACY_ARGS)
    text = (
        "<tool_call>\n<function=trace_route>\n"
        '<parameter=path>\n[{"x": 1}, {}]\n</parameter>\n'
        '<parameter=origin>\n{"x": 1, "y": 2}\n</parameter>\n'
        "</function>\n</tool_call>"
    )
    assert follows(outputs, tokenizer, spec, text)


@pytest.mark.parametrize(
    "parameters, message",
    [
        (
            {
                "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#"}}}},
                "type": "object",
                "properties": {"head": {"$ref": "#/$defs/Node"}},
            },
            "tool 'f' parameter 'head': .* is recursive",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
            "tool 'f' parameter 'a': .* points to nothing",
        ),
        ({"type": "object", "properties": ["a"]}, "'properties' must be an object"),
    ],
)
def test_schemas_a_call_cannot_follow_are_400s_naming_the_tool(parameters, message):
    with pytest.raises(OpenAIError, match=message) as raised:
        forced("f", parameters)
    assert raised.value.status == 400 and raised.value.param == "tools"


@pytest.mark.parametrize(
    "parameters, message",
    [
        (
            {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**6}}},
            "tool 'f' parameters: /properties/a: maxLength=1000000 is outside",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "minLength": 1.5}}},
            "tool 'f' parameters: /properties/a: minLength=1.5 must be a non-negative integer",
        ),
    ],
)
def test_schemas_past_the_limits_are_refused_with_the_body(parameters, message):
    """Bounds hold whether or not the call is forced: the body itself is refused (a 400)."""
    with pytest.raises(pydantic.ValidationError, match=message):
        forced("f", parameters)
