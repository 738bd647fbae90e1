"""POST /v1/responses: OpenAI's Responses API, translated into a chat completion request and
served by the chat route's pipeline (template, grammar, replicas, migration, parsers); only
the shapes differ. The body is `responses_protocol.ResponsesRequest`; the output items and
stream events are built in `responses_stream.py`.

Input: a string (one user message) or a list of items:
- messages (`type` "message" or omitted) with role user, assistant, system or developer and
  content as a string or a list of input_text / output_text / refusal parts, and in user
  messages input_image parts ({"image_url": a data: URI or an allowed URL}: the chat route's
  image_url parts, held to its media limits; a file_id is refused: no files API). System and
  developer messages become the one system message the chat template allows, after
  `instructions`, so they must come before every other item;
- `function_call` items (a previous turn's call) join the assistant message before them as
  its tool_calls; `function_call_output` items become tool messages;
- `reasoning` items give their reasoning_text to the assistant message or call that follows
  them, which the template replays within the current turn (as the chat route's
  reasoning_content); one followed by no assistant output is dropped, as is one without
  readable content (encrypted_content is never produced here, nor read).
Anything else (files, audio, images outside user messages, item references, built-in tool
calls) is a 400 naming the item.

Fields:
- tools (function tools) and tool_choice auto / none / required / {type: function, name}: a
  forced call follows the parameters' schema through the grammar, `strict` or not; with auto
  the arguments are typed by the schema but not forced. parallel_tool_calls false drops calls
  after the first.
- max_output_tokens, temperature, top_p: as max_tokens, temperature, top_p on chat.
- text.format text / json_object / json_schema: the chat route's response_format (grammar).
- reasoning.effort: "none" turns thinking off, any other value on (the template has no
  levels), and without it the template's default holds (on), as vLLM maps it;
  `chat_template_kwargs.enable_thinking` works too, and a contradiction is a 400.
- accepted without effect: reasoning.summary (reasoning comes back whole, as reasoning_text),
  text.verbosity, include reasoning.encrypted_content (none is produced), metadata and user
  (echoed), store, and any field this server does not know.
- vLLM's extra body: top_k, min_p, presence / frequency / repetition_penalty, seed, stop,
  stop_token_ids, logit_bias, thinking_token_budget, ignore_eos, chat_template_kwargs, as on
  the chat route.
- refused with a 400 naming the field: previous_response_id, conversation, prompt,
  background true, truncation auto, top_logprobs > 0, include message.output_text.logprobs,
  context_management, moderation, tools other than functions, other tool_choice types.

Store: nothing is kept. The API's default for `store` is true, so refusing it would fail every
SDK call that leaves it out; storing per ingress replica would make `previous_response_id`
work or 400 depending on which replica a request lands on. Clients send the conversation
(the previous output items can go back into `input` as they are).

Usage: input_tokens and output_tokens count what the chat route counts for the same
conversation; cached_tokens is the prompt's prefix-cache hit as the engine reports it;
reasoning_tokens counts output tokens from the start of reasoning up to its `</think>`.
"""

import contextlib
import json
from typing import Any

from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.fanout import close_all, start_all
from qwen35_ray.serving.parsers import prompt_ends_in_reasoning
from qwen35_ray.serving.protocol import ChatCompletionRequest
from qwen35_ray.serving.request_body import validate
from qwen35_ray.serving.responses_protocol import ResponsesRequest
from qwen35_ray.serving.responses_stream import ResponseBuilder, event_stream
from qwen35_ray.serving.structured import chat_spec

# vLLM's extra-body fields, passed to the chat pipeline under the same names
PASSED = (
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "logit_bias",
    "thinking_token_budget",
    "ignore_eos",
    "skip_special_tokens",
    "chat_template",
)
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio", "image_url", "file"})
# the chat pipeline's names for what the Responses API calls otherwise, for its errors
RENAMED = (
    ("messages", "input"),
    ("max_tokens", "max_output_tokens"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
)


async def create_response(ingress, req: ResponsesRequest):
    """The route's work, with the ingress's helpers: a JSON response or an SSE stream."""
    with _responses_names():
        chat = validate(ChatCompletionRequest, chat_body(req), ingress.context)
        prompt, ids, images = await ingress._chat_input(chat)
        max_tokens = ingress._max_tokens(chat.max_new_tokens, len(ids))
        in_reasoning = prompt_ends_in_reasoning(prompt)
        params = ingress._params(chat, max_tokens, None, lambda: chat_spec(chat, in_reasoning))
        model, tokenizer = ingress.cfg.model_name, ingress.tokenizer
        builder = ResponseBuilder(req, chat, prompt, len(ids), params, model, tokenizer)
        stream = ingress._stream(ids, params, images)
        if req.stream:
            (stream,) = await start_all([stream])
            return event_stream(builder, stream)
        try:
            async for step in stream:
                builder.feed(step)
        except BaseException:
            await close_all([stream])
            raise
    builder.finish()
    return builder.response()


@contextlib.contextmanager
def _responses_names():
    """Errors of the chat pipeline in the Responses API's names (input, max_output_tokens)."""
    try:
        yield
    except OpenAIError as e:
        message, param = e.message, e.param
        for old, new in RENAMED:
            message = message.replace(old, new)
            param = param.replace(old, new) if param else param
        raise OpenAIError(message, e.status, e.type, param, e.headers) from None


def chat_body(req: ResponsesRequest) -> dict:
    """The chat completion body equivalent to a Responses request."""
    body: dict[str, Any] = {
        "model": req.model,
        "messages": chat_messages(req.instructions, req.input),
    }
    extra = req.model_extra or {}
    body.update({k: extra[k] for k in PASSED if k in extra})
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": t.model_dump(
                    include={"name", "description", "parameters"}, exclude_none=True
                ),
            }
            for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    for ours, theirs in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    fmt = req.text.format if req.text else None
    if fmt is not None:
        body["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            body["response_format"]["json_schema"] = {"name": fmt.name, "schema": fmt.schema_}
    kwargs = extra.get("chat_template_kwargs")
    thinking = req.thinking()
    if thinking is not None:
        kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
        if kwargs.setdefault("enable_thinking", thinking) != thinking:
            raise OpenAIError(
                f"reasoning.effort {req.reasoning.effort!r} contradicts chat_template_kwargs "
                f"enable_thinking={kwargs['enable_thinking']!r}; give one of them",
                param="reasoning.effort",
            )
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    return body


def chat_messages(instructions: str | None, items: str | list[dict]) -> list[dict]:
    """Chat messages from `instructions` and `input` (see the module's docstring)."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    system = [instructions] if instructions else []
    messages: list[dict] = []
    reasoning = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise OpenAIError(f"{where} must be an object (an input item)", param=where)
        kind = item.get("type") or "message"
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content", role == "user")
            if role in ("system", "developer"):
                if messages:
                    raise OpenAIError(
                        f"{where} is a {role} message after other items; the chat template "
                        "takes one system message, at the start: put it first, or into "
                        "instructions",
                        param=where,
                    )
                system.append(text)
            elif role == "user":
                messages.append({"role": "user", "content": _user_content(item, where, text)})
            elif role == "assistant":
                messages.append(_assistant(text, reasoning))
            else:
                raise OpenAIError(
                    f"{where}.role is {str(role)[:40]!r}; use user, assistant, system or developer",
                    param=f"{where}.role",
                )
            reasoning = None
        elif kind == "function_call":
            call = _call(item, where)
            last = messages[-1] if messages else None
            if reasoning is None and last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({**_assistant("", reasoning), "tool_calls": [call]})
            reasoning = None
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            call_id = item.get("call_id")
            messages.append({"role": "tool", "tool_call_id": str(call_id or ""), "content": text})
            reasoning = None
        elif kind == "reasoning":
            reasoning = _reasoning(item, where)
        else:
            raise OpenAIError(
                f"{where}.type is {str(kind)[:40]!r}: input items may be messages, "
                "function_call, function_call_output or reasoning (item references, built-in "
                "tool calls and their outputs are not supported)",
                param=f"{where}.type",
            )
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return messages


def _assistant(text: str, reasoning: str | None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _user_content(item: dict, where: str, text: str) -> str | list[dict]:
    """A user message's content for the chat route: its text, or, when it holds input_image
    parts, the chat route's text and image_url parts in order."""
    content = item.get("content")
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and p.get("type") == "input_image" for p in content
    ):
        return text
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "input_image":
            # checked by _text already
            parts.append({"type": "text", "text": part[TEXT_PARTS[part["type"]]]})
            continue
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            param = f"{where}.content[{j}].image_url"
            if part.get("file_id") is not None:
                message = f"{where}.content[{j}] names a file_id: there is no files API here; "
            else:
                message = f"{param} is missing; "
            raise OpenAIError(
                message + "give image_url as a data: URI (data:image/png;base64,...) or an "
                "http(s) URL",
                param=param,
            )
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _text(content: Any, where: str, images: bool = False) -> str:
    """A message's content as the text the template would render from its parts; images:
    input_image parts are skipped (a user message's, see _user_content)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if images and kind == "input_image":
            continue
        if kind in MEDIA_PARTS:
            taken = "input_text and, in user messages, input_image parts"
            raise OpenAIError(
                f"{where}[{j}].type is {kind!r}: file and audio input, and images outside "
                f"user messages, are not supported; send {taken}",
                param=f"{where}[{j}].type",
            )
        key = TEXT_PARTS.get(kind)
        if key is None or not isinstance(part.get(key), str):
            raise OpenAIError(
                f"{where}[{j}] must be a text part: {{'type': 'input_text', 'text': '...'}}",
                param=f"{where}[{j}]",
            )
        texts.append(part[key])
    return "".join(texts)


def _call(item: dict, where: str) -> dict:
    name, arguments = item.get("name"), item.get("arguments")
    if not isinstance(name, str) or not name:
        raise OpenAIError(f"{where}.name must be the function's name", param=f"{where}.name")
    try:
        parsed = json.loads(arguments, parse_constant=float) if isinstance(arguments, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise OpenAIError(
            f"{where}.arguments must be a JSON object, as text", param=f"{where}.arguments"
        )
    call_id = item.get("call_id")
    return {
        "id": call_id if isinstance(call_id, str) else "",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _reasoning(item: dict, where: str) -> str | None:
    content = item.get("content")
    if not isinstance(content, list):
        return None
    texts = [p.get("text") for p in content if isinstance(p, dict)]
    if not all(isinstance(t, str) for t in texts):
        raise OpenAIError(
            f"{where}.content must be reasoning_text parts: {{'type': 'reasoning_text', "
            "'text': '...'}",
            param=f"{where}.content",
        )
    return "".join(texts) or None
