"""Bounds on what a user's JSON schema may ask of the grammar compiler.

A schema (a tool's parameters, a `response_format`) becomes a grammar the engine compiles
before the request's first token: a `maxLength` of 10**9, thousands of nested objects or a
megabyte of enum values would each cost the replica seconds or gigabytes. `check_schema`
refuses them with a ValueError naming where the schema came from and the limit; the ingress
turns it into a 400.
"""

import json

# minLength, maxItems, ...: the grammar repeats a rule up to this many times
MAX_COUNT = 4096
# nested subschemas (an object in an array in an object is depth 4)
MAX_DEPTH = 16
# the schema as compact JSON
MAX_SCHEMA_BYTES = 64 * 1024
# values of one `enum`
MAX_ENUM = 256
# characters of one `pattern` (a regex the compiler turns into an automaton)
MAX_PATTERN_CHARS = 1024

COUNT_KEYWORDS = (
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
# keywords whose value is a map of names to subschemas
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# keywords whose value is one subschema (schema_refs.py walks them too)
SCHEMA_ONE = (
    "items",
    "additionalProperties",
    "additionalItems",
    "unevaluatedProperties",
    "unevaluatedItems",
    "propertyNames",
    "contains",
    "not",
    "if",
    "then",
    "else",
)
# keywords whose value is a list of subschemas
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def check_schema(schema, where: str) -> None:
    """ValueError naming `where` (e.g. "tool 'f' parameters") and the limit a schema breaks."""
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{where}: the schema is not JSON ({e})") from e
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(
            f"{where}: the schema is {size} bytes as JSON, over the {MAX_SCHEMA_BYTES}-byte "
            "limit; shorten it"
        )
    # iterative, so a deep schema is refused instead of exhausting the stack
    todo = [(schema, 1, "")]
    while todo:
        node, depth, path = todo.pop()
        if depth > MAX_DEPTH:
            raise ValueError(
                f"{where}: the schema nests deeper than {MAX_DEPTH} levels at {path or '/'}; "
                "flatten it"
            )
        if not isinstance(node, dict):
            if not isinstance(node, bool):
                raise ValueError(f"{where}: {path or '/'} is not a schema (an object or a bool)")
            continue
        _check_keywords(node, f"{where}: {path or '/'}")
        todo += _children(node, depth, path)


def _check_keywords(node: dict, at: str) -> None:
    for key in COUNT_KEYWORDS:
        if key not in node:
            continue
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{at}: {key}={value!r} must be a non-negative integer")
        if not 0 <= value <= MAX_COUNT:
            raise ValueError(f"{at}: {key}={value} is outside [0, {MAX_COUNT}]; lower it")
    if "enum" in node:
        if not isinstance(node["enum"], list):
            raise ValueError(f"{at}: enum must be a list of values")
        if len(node["enum"]) > MAX_ENUM:
            raise ValueError(f"{at}: enum has {len(node['enum'])} values, over {MAX_ENUM}")
    if "pattern" in node:
        pattern = node["pattern"]
        if not isinstance(pattern, str):
            raise ValueError(f"{at}: pattern must be a string")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ValueError(
                f"{at}: pattern has {len(pattern)} characters, over {MAX_PATTERN_CHARS}"
            )


def _children(node: dict, depth: int, path: str) -> list[tuple]:
    out = []
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out += [(v, depth + 1, f"{path}/{key}/{k}") for k, v in node[key].items()]
    for key in SCHEMA_ONE:
        # `items` may still be a list of schemas (draft 7's tuples)
        if key in node and not isinstance(node[key], list):
            out.append((node[key], depth + 1, f"{path}/{key}"))
    for key in (*_SCHEMA_LISTS, "items"):
        if isinstance(node.get(key), list):
            out += [(v, depth + 1, f"{path}/{key}/{i}") for i, v in enumerate(node[key])]
    return out
