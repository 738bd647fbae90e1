"""Turning a chat request into prompt tokens, and model output back into OpenAI messages."""

import json
import time
import uuid

from qwen35_ray.serving import limits
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.parsers import ReasoningParser, ToolCallParser, prompt_ends_in_reasoning
from qwen35_ray.serving.protocol import ChatCompletionRequest, ChatInput
from qwen35_ray.serving.request_body import scan


def render_prompt(tokenizer, req: ChatInput, add_generation_prompt: bool = True) -> str:
    """The chat template applied to a validated request (a chat completion or /tokenize).
    Blocking: the ingress calls it in a worker thread with a time budget."""
    messages = [_normalise(m) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    kwargs = dict(req.chat_template_kwargs or {})
    # present only when the operator trusts request templates (checks.chat_template)
    if req.chat_template is not None:
        kwargs["chat_template"] = req.chat_template
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except Exception as e:  # the template's own checks (roles, order, content parts)
        raise OpenAIError(
            f"messages could not be rendered by the chat template: {e}", param="messages"
        ) from None


def _normalise(message: dict) -> dict:
    """The template reads tool-call arguments as a mapping; clients send JSON strings."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"] or "{}", parse_constant=float)
            except (ValueError, RecursionError) as e:
                raise OpenAIError(
                    f"tool call arguments are not valid JSON: {e}", param="messages"
                ) from None
            # the body's own checks, for the JSON inside this string
            if scan(fn["arguments"], limits.MAX_JSON_DEPTH)[0] is not None:
                raise OpenAIError(
                    "tool call arguments nest too deeply or hold a lone surrogate",
                    param="messages",
                )
        fixed.append({**call, "function": fn})
    return {**message, "tool_calls": fixed}


class ChoiceParser:
    """Splits one choice's output into reasoning, content and tool calls, whole or streamed."""

    def __init__(self, prompt: str, req: ChatCompletionRequest):
        self.reasoning = ReasoningParser(prompt_ends_in_reasoning(prompt))
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        self.tools = ToolCallParser(tools) if use_tools else None
        self.num_calls = 0

    def whole(self, text: str) -> dict:
        reasoning, content = self.reasoning.parse(text)
        calls = []
        if self.tools is not None and content:
            content, calls = self.tools.parse(content)
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        if calls:
            message["tool_calls"] = calls
        self.num_calls = len(calls)
        return message

    def delta(self, text: str, final: bool = False) -> list[dict]:
        """Delta messages for newly generated text (and whatever was held back, when final)."""
        r, c = self.reasoning.feed(text) if text else (None, None)
        out = []
        if final:
            r2, c2 = self.reasoning.flush()
            r, c = _join(r, r2), _join(c, c2)
        if r:
            out.append({"reasoning_content": r})
        events = []
        if self.tools is None:
            if c:
                out.append({"content": c})
            return out
        if c:
            events += self.tools.feed(c)
        if final:
            events += self.tools.flush()
        for event in events:
            if event[0] == "content":
                if event[1]:
                    out.append({"content": event[1]})
            else:
                _, index, call = event
                self.num_calls += 1
                out.append({"tool_calls": [{"index": index, **call}]})
        return out


def _join(a, b):
    return (a or "") + (b or "") or None


def chat_response(model: str, choices: list[dict], usage: dict) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunk(rid: str, model: str, created: int, choices: list[dict], usage=None) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict], top: int) -> dict:
    content = []
    for token, lp in zip(token_ids, logprobs):
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append(
            {
                **_entry(tokenizer, token, lp[token]),
                "top_logprobs": [_entry(tokenizer, t, v) for t, v in ranked],
            }
        )
    return {"content": content}


def _entry(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
