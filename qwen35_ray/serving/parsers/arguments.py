"""Typing of tool-call parameter values, which the XML format carries as bare text."""

import ast
import json
from typing import Any

# Tried in this order when a schema allows several types; string is handled apart, last
_CONVERSION_ORDER = ("null", "boolean", "integer", "number", "object", "array")


def schema_types(schema: dict | None) -> set[str]:
    """JSON-schema types a parameter allows; empty when the schema does not say."""
    if not isinstance(schema, dict):
        return set()
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or ())
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key) or ():
            types |= schema_types(option)
    return {t for t in types if isinstance(t, str)}


def convert_value(text: str, schema: dict | None) -> Any:
    """The JSON value of a parameter's text, typed by its schema.

    A string parameter keeps its text as written ("007" stays "007"). A value that does not
    fit its schema, or has no schema (unknown tool or parameter), is read as JSON if it is
    JSON and kept as a string otherwise: the client sees what the model wrote.
    """
    types = schema_types(schema)
    if "string" in types:
        if "null" in types and text.strip() == "null":
            return None
        return text
    for type_name in _CONVERSION_ORDER:
        if type_name in types:
            ok, value = _CONVERTERS[type_name](text.strip())
            if ok:
                return value
    return _best_effort(text)


def _best_effort(text: str) -> Any:
    try:
        return _strict_json(text)
    except ValueError:
        return text


def _strict_json(text: str) -> Any:
    """json.loads without NaN and Infinity, which json.dumps would write as invalid JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _to_null(text: str) -> tuple[bool, Any]:
    return text == "null", None


def _to_boolean(text: str) -> tuple[bool, Any]:
    lowered = text.lower()
    return lowered in ("true", "false"), lowered == "true"


def _to_integer(text: str) -> tuple[bool, Any]:
    try:
        return True, int(text)
    except ValueError:
        pass
    # "3.0" for an integer parameter is still the integer 3
    number = _to_number(text)[1]
    if isinstance(number, float) and number.is_integer():
        return True, int(number)
    return False, None


def _to_number(text: str) -> tuple[bool, Any]:
    # Integers stay integers ("3" -> 3), so arguments read back as the model wrote them
    for parse in (int, float):
        try:
            value = parse(text)
        except ValueError:
            continue
        if value == value and value not in (float("inf"), float("-inf")):
            return True, value
    return False, None


def _to_container(kind: type) -> Any:
    def convert(text: str) -> tuple[bool, Any]:
        # Models sometimes write Python literals (single quotes, True) for JSON ones
        for parse in (_strict_json, ast.literal_eval):
            try:
                value = parse(text)
                # A Python literal may hold what JSON cannot (tuples as keys, sets, bytes)
                json.dumps(value, allow_nan=False)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, kind):
                return True, value
        return False, None

    return convert


_CONVERTERS = {
    "null": _to_null,
    "boolean": _to_boolean,
    "integer": _to_integer,
    "number": _to_number,
    "object": _to_container(dict),
    "array": _to_container(list),
}
