"""The grammar of a forced tool call accepts what the chat template and the parser agree on,
and refuses a call the parser would read as invalid arguments."""

import json

import pytest
import transformers
from json_schemas import WEATHER_ARGS

from qwen35_ray.engine.structured import StructuredOutputs
from qwen35_ray.serving.chat import ChoiceParser
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
