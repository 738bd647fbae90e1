"""Request-body schemas for /openapi.json. The routes read a raw Request (they validate the
body themselves, to answer in OpenAI's error format), so FastAPI sees no body model; each POST
route names its pydantic model here, with every $ref inlined, so that a client generator or a
fuzzer reading /openapi.json knows what to send."""

from pydantic import BaseModel


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose JSON body is `model`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(schema, defs)}},
        }
    }


def _inline(node, defs: dict):
    # the request models are not recursive, so inlining ends
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline(defs[ref.removeprefix("#/$defs/")], defs), **_inline(rest, defs)}
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node
