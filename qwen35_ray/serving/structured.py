"""The engine's grammar spec (`SamplingParams.structured`) for a request's `response_format`
or forcing `tool_choice`.

A forced tool call is a structural tag (xgrammar's format, compiled by the engine) that writes
exactly the qwen3_coder layout the chat template documents and `parsers/tool_calls.py` reads:

    <tool_call>\\n<function=NAME>\\n
    <parameter=P>\\nVALUE\\n</parameter>\\n      (each declared parameter, in order; required
                                                 ones always, others optionally)
    </function>\\n</tool_call>

VALUE is the parser's reading of a parameter: raw text for a string parameter (no `<` in it, so
it cannot close its tag early; `enum`, `pattern`, `minLength`, `maxLength` honoured), JSON
valid against the parameter's schema for any other type. One call per response. Each
parameter's schema stands alone: its `$ref`s into the parameters' `$defs` are inlined (the
parser reads it the same way), and a schema past the limits of `schema_limits` is a 400.

When the prompt leaves `<think>` open (thinking on), reasoning stays free and the grammar, of a
call or of a response format, starts after the model's `</think>`. The model cannot end its
reasoning with EOS (the engine denies those tokens before `</think>`), so a forced call is
written unless max_tokens (or the request's own stop) comes first; `thinking_token_budget`
bounds the reasoning.
"""

from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.parsers.arguments import schema_types
from qwen35_ray.serving.parsers.tags import THINK_END
from qwen35_ray.serving.protocol import ChatCompletionRequest, NamedToolChoice, ResponseFormat
from qwen35_ray.serving.schema_limits import check_schema
from qwen35_ray.serving.schema_refs import inline_refs


def response_format_spec(fmt: ResponseFormat | None) -> dict | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "schema": fmt.json_schema.schema_}


def chat_spec(req: ChatCompletionRequest, prompt_in_reasoning: bool) -> dict | None:
    """The grammar of a chat request: its forced tool call, else its response format."""
    choice = req.tool_choice
    forcing = choice == "required" or isinstance(choice, NamedToolChoice)
    if not forcing:
        return _after_reasoning(response_format_spec(req.response_format), prompt_in_reasoning)
    if req.response_format is not None and req.response_format.type != "text":
        raise OpenAIError(
            "response_format cannot be combined with a tool_choice that forces a call; "
            "use tool_choice 'auto' or drop response_format",
            param="response_format",
        )
    tools = [t.function for t in req.tools or []]
    if isinstance(choice, NamedToolChoice):
        tools = [f for f in tools if f.name == choice.function.name]
    try:
        calls = [_call(f.name, f.parameters or {}) for f in tools]
    except ValueError as e:
        raise OpenAIError(str(e), param="tools") from e
    fmt = calls[0] if len(calls) == 1 else {"type": "or", "elements": calls}
    if prompt_in_reasoning:
        # the template's layout after reasoning
        fmt = {"type": "sequence", "elements": [_const("\n\n"), fmt]}
    return _after_reasoning({"type": "structural_tag", "format": fmt}, prompt_in_reasoning)


def _after_reasoning(spec: dict | None, prompt_in_reasoning: bool) -> dict | None:
    """Reasoning stays free: the grammar starts after `</think>` (the engine's `after`)."""
    return {**spec, "after": THINK_END} if spec and prompt_in_reasoning else spec


def _call(name: str, parameters: dict) -> dict:
    check_schema(parameters, f"tool {name!r} parameters")
    properties = parameters.get("properties") or {}
    required = parameters.get("required") or []
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise ValueError(
            f"tool {name!r} parameters: 'properties' must be an object and 'required' a list"
        )
    elements = []
    for key, schema in properties.items():
        if isinstance(schema, dict):
            schema = inline_refs(schema, parameters, f"tool {name!r} parameter {key!r}")
            elements.append(_parameter(key, schema, key in required))
    if not elements:
        content = _const("")
    elif len(elements) == 1:
        content = elements[0]
    else:
        content = {"type": "sequence", "elements": elements}
    return {
        "type": "tag",
        "begin": f"<tool_call>\n<function={name}>\n",
        "content": content,
        "end": "</function>\n</tool_call>",
    }


def _parameter(name: str, schema: dict, required: bool) -> dict:
    tag = {
        "type": "tag",
        "begin": f"<parameter={name}>\n",
        "content": _value(schema),
        "end": "\n</parameter>\n",
    }
    return tag if required else {"type": "optional", "content": tag}


def _value(schema: dict) -> dict:
    if "string" not in schema_types(schema):
        # one whitespace at most between JSON tokens, so a value always comes to an end
        return {
            "type": "json_schema",
            "json_schema": schema or True,
            "style": "json",
            "max_whitespace_cnt": 1,
        }
    options = schema.get("enum") or ([schema["const"]] if "const" in schema else [])
    if options:
        return {"type": "or", "elements": [_const(str(v)) for v in options]}
    if "pattern" in schema:
        return {"type": "regex", "pattern": schema["pattern"]}
    # a grammar's counted repeat compiles in microseconds; a regex's {m,n} grows with n
    low, high = schema.get("minLength", 0), schema.get("maxLength", -1)
    return {"type": "grammar", "grammar": f"root ::= [^<]{{{low},{high}}}"}


def _const(text: str) -> dict:
    return {"type": "const_string", "value": text}
