"""Rules on request fields that a type alone cannot say, used as pydantic validators by
protocol.py. Each raises ValueError with a message naming the field and what is allowed.

Validation context (`model_validate(data, context=...)`), set by the ingress:
- vocab_size: token ids (stop_token_ids, logit_bias keys, prompt ids) must be below it;
- trust_request_chat_template: a request may bring its own chat template.
"""

import re
from typing import Any

from pydantic import ValidationInfo

from qwen35_ray.serving import limits

# parts that carry media; the served model reads text only for now
# content parts a chat message may not hold: OpenAI's and other servers' names for media this
# server does not take (images come as image_url parts)
MEDIA_PARTS = frozenset(
    {"input_image", "image", "video", "video_url", "input_audio", "audio", "file"}
)

# arguments apply_chat_template takes itself: a request setting them would replace the
# conversation, the template or the output type
RESERVED_TEMPLATE_ARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

UNTRUSTED_TEMPLATE = (
    "a request-supplied chat template is refused: rendering runs arbitrary Jinja on the "
    "server; the operator may allow it with trust_request_chat_template: true in the app config"
)

_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def _context(info: ValidationInfo | None) -> dict:
    return (info.context if info is not None else None) or {}


def check_token_ids(ids: list[int], info: ValidationInfo | None, where: str = "") -> None:
    vocab = _context(info).get("vocab_size")
    for t in ids:
        if t < 0 or (vocab is not None and t >= vocab):
            bound = f"in [0, {vocab})" if vocab is not None else "non-negative"
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}token id {t} is outside the vocabulary; ids must be {bound}")


def stop_strings(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else list(stop)
    if len(stop) > limits.MAX_STOP_STRINGS:
        raise ValueError(f"at most {limits.MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not 1 <= len(s) <= limits.MAX_STOP_LENGTH:
            raise ValueError(
                f"each stop string must have 1 to {limits.MAX_STOP_LENGTH} characters, "
                f"got one of {len(s)}"
            )
    return stop


def token_ids(ids: list[int] | None, info: ValidationInfo) -> list[int] | None:
    if ids is not None:
        check_token_ids(ids, info)
    return ids


def logit_bias(bias: dict[str, float] | None, info: ValidationInfo) -> dict[int, float] | None:
    """OpenAI's shape (token id strings -> bias in [-100, 100]) as {int: float}."""
    if bias is None:
        return None
    if len(bias) > limits.MAX_LOGIT_BIAS:
        raise ValueError(f"at most {limits.MAX_LOGIT_BIAS} entries, got {len(bias)}")
    out = {}
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key):
            raise ValueError(f"key {key[:20]!r} is not a token id (a non-negative integer)")
        if not limits.LOGIT_BIAS_MIN <= value <= limits.LOGIT_BIAS_MAX:
            raise ValueError(
                f"bias of token {key} is {value}; biases must be in "
                f"[{limits.LOGIT_BIAS_MIN:g}, {limits.LOGIT_BIAS_MAX:g}]"
            )
        out[int(key)] = float(value)
    check_token_ids(list(out), info)
    return out


def messages(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Roles, content shapes and tool calls, so that rendering meets only what it can read."""
    for i, m in enumerate(msgs):
        if not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] needs a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"messages[{i}].content[{j}]")
        elif content is not None and not isinstance(content, str):
            raise ValueError(
                f"messages[{i}].content must be a string or a list of text and image_url parts"
            )
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise ValueError(f"messages[{i}].reasoning_content must be a string")
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ValueError(f"messages[{i}].tool_calls must be a list")
            for j, call in enumerate(calls):
                _check_call(call, f"messages[{i}].tool_calls[{j}]")
    return msgs


def _check_part(part: Any, where: str) -> None:
    """A text part, or an image_url part's shape (its image is read by serving/media.py)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else None
        if not isinstance(url, str) or not url:
            raise ValueError(
                f"{where}.image_url must be {{'url': 'data:image/png;base64,...'}} or "
                "{'url': 'https://...'}"
            )
        return
    if kind in MEDIA_PARTS:
        raise ValueError(
            f"{where}.type is {kind!r}: video and audio input are not supported; send text "
            "and image_url parts ({'type': 'image_url', 'image_url': {'url': ...}})"
        )
    if kind != "text" or not isinstance(part.get("text"), str):
        raise ValueError(
            f"{where} must be a text part {{'type': 'text', 'text': '...'}} or an image_url "
            "part {'type': 'image_url', 'image_url': {'url': ...}}"
        )


def _check_call(call: Any, where: str) -> None:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where} needs a function with a string name")
    if not isinstance(fn.get("arguments"), (str, dict, type(None))):
        raise ValueError(f"{where}.function.arguments must be a JSON string or an object")


def template_kwargs(kwargs: dict[str, Any] | None, info: ValidationInfo) -> dict | None:
    if kwargs is None:
        return None
    if len(kwargs) > limits.MAX_TEMPLATE_KWARGS:
        raise ValueError(f"at most {limits.MAX_TEMPLATE_KWARGS} entries, got {len(kwargs)}")
    for key, value in kwargs.items():
        if key == "chat_template":
            chat_template(value, info)
            continue
        if key in RESERVED_TEMPLATE_ARGS:
            raise ValueError(f"{key!r} is set by the server and cannot be given here")
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise ValueError(f"{key!r} must be a JSON scalar (boolean, number, string or null)")
        if isinstance(value, str) and len(value) > limits.MAX_TEMPLATE_KWARG_LENGTH:
            raise ValueError(
                f"{key!r} is {len(value)} characters; at most "
                f"{limits.MAX_TEMPLATE_KWARG_LENGTH} are allowed"
            )
    return kwargs


def chat_template(template: Any, info: ValidationInfo) -> str | None:
    if template is None:
        return None
    if not _context(info).get("trust_request_chat_template", False):
        raise ValueError(UNTRUSTED_TEMPLATE)
    if not isinstance(template, str):
        raise ValueError("a chat template must be a string")
    return template
