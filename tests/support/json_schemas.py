"""Twenty varied JSON schemas for structured-output tests: nested objects, arrays, enums,
required fields, bounded integers, numbers, booleans, nulls, anyOf, patterns.

A random-weight model writes whatever the grammar lets it, so every string has a maxLength
and every array a maxItems: the grammar then reaches its end within a bounded number of
tokens (the engine writes JSON compact, with no free whitespace), and the output finishes
with "stop" well inside the tests' max_tokens.
"""

# a person with bounded fields: the engine's structured-output and resume tests
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
}

# the parameters of a get_weather tool, shared by the tool-call tests
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
}

S = {"type": "string", "maxLength": 6}
INT = {"type": "integer", "minimum": -5, "maximum": 500}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS = [
    obj({"name": S}),
    obj({"age": INT}),
    obj({"ok": {"type": "boolean"}, "note": {"type": "null"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"level": {"type": "integer", "enum": [1, 2, 3]}, "tag": {"const": "v1"}}),
    obj({"tags": {"type": "array", "items": S, "maxItems": 3}}),
    obj({"point": obj({"x": INT, "y": INT})}),
    obj({"user": obj({"name": S, "address": obj({"city": S, "zip": INT})})}),
    obj({"items": {"type": "array", "items": obj({"id": INT, "qty": INT}), "maxItems": 2}}),
    obj({"name": S, "nick": S}, required=["name"]),
    obj({"a": INT, "b": INT, "c": INT}, required=["b"]),
    obj({"count": {"type": "integer", "minimum": 10, "maximum": 20}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    obj({"value": {"anyOf": [INT, S]}}),
    obj(
        {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": INT, "maxItems": 2},
                "maxItems": 2,
            }
        }
    ),
    obj({"status": {"enum": ["ok", "error"]}, "detail": S}, required=["status"]),
    obj({"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}}),
    obj({"meta": obj({"version": INT, "stable": {"type": "boolean"}}), "id": S}),
    {"type": "array", "items": obj({"k": S, "v": INT}), "minItems": 1, "maxItems": 2},
]


# a tool's parameters the way pydantic writes a nested model: refs into `$defs`, one def
# referring to another, an optional ref (anyOf with null), arrays of refs
ORDER_ARGS = {
    "$defs": {
        "Item": {
            "type": "object",
            "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "Address": {
            "type": "object",
            "properties": {"street": S, "city": {"$ref": "#/$defs/City"}},
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "City": {"type": "string", "maxLength": 5, "description": "a city"},
    },
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "maxItems": 2},
        "ship_to": {"$ref": "#/$defs/Address", "description": "where to send it"},
        "bill_to": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
        "city": {"$ref": "#/$defs/City"},
        "note": {"type": "object", "properties": {"text": S}, "required": ["text"]},
    },
    "required": ["items", "ship_to", "bill_to", "city", "note"],
    "additionalProperties": False,
}

# the same shapes under draft 7's `definitions`
LEGACY_ARGS = {
    "definitions": {"Point": {"type": "object", "properties": {"x": INT, "y": INT}}},
    "type": "object",
    "properties": {
        "path": {"type": "array", "items": {"$ref": "#/definitions/Point"}, "maxItems": 2},
        "origin": {"$ref": "#/definitions/Point"},
    },
    "required": ["path", "origin"],
}
