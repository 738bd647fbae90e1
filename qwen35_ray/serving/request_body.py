"""Reading a request body: capped while it arrives, and refused with a 400 for what Python's
json accepts but nothing downstream should meet: nesting past a bound (validators and templates
recurse), lone surrogates (they cannot be encoded as UTF-8), NaN and Infinity."""

import json
import re

import pydantic
from starlette.requests import Request

from qwen35_ray.serving import limits
from qwen35_ray.serving.errors import OpenAIError

_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_capped(request: Request, cap: int) -> bytes:
    """The body, refused with 413 as soon as it passes `cap` bytes (chunked bodies too)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise _too_large(cap)
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > cap:
            raise _too_large(cap)
        chunks.append(piece)
    return b"".join(chunks)


def _too_large(cap: int) -> OpenAIError:
    return OpenAIError(
        f"the request body is over max_request_bytes={cap}; send less or raise "
        "max_request_bytes in the app config",
        413,
    )


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_object(raw: bytes) -> dict:
    """A JSON object from the body, or a 400 saying what is wrong with it. Runs in a worker
    thread: a few MB of JSON take tens of milliseconds."""
    deep = OpenAIError(f"the body nests deeper than {limits.MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        # json's C parser stops at Python's recursion limit, well before the C stack does
        raise deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenAIError(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OpenAIError("the body must be a JSON object")
    problem, where = scan(data, limits.MAX_JSON_DEPTH)
    if problem == "depth":
        raise deep
    if problem == "surrogate":
        raise OpenAIError(
            f"{where} holds a lone UTF-16 surrogate (such as \\ud800), which is not a "
            "character; send valid Unicode",
            param=where,
        )
    return data


def scan(value, max_depth: int) -> tuple[str | None, str | None]:
    """("depth", path) past max_depth, ("surrogate", path) for a string or key holding a lone
    surrogate, else (None, None). Paths read like messages[0].content."""
    stack = [("", value, 0)]
    while stack:
        path, v, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return "surrogate", path or "the body"
            continue
        if not isinstance(v, (dict, list)):
            continue
        if depth >= max_depth:
            return "depth", path
        if isinstance(v, dict):
            for k, item in v.items():
                # the path goes into the error body, which must encode as UTF-8
                here = _join(path, k.encode("utf-8", "backslashreplace").decode())
                if _SURROGATE.search(k):
                    return "surrogate", here
                stack.append((here, item, depth + 1))
        else:
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(v))
    return None, None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate(model_cls: type[pydantic.BaseModel], data: dict, context: dict):
    """The body as `model_cls`, or a 400 naming the first field at fault."""
    try:
        return model_cls.model_validate(data, context=context)
    except pydantic.ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(x) for x in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise OpenAIError(f"{where}: {message}" if where else message, param=where) from None
