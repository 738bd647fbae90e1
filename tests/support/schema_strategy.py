"""Hypothesis strategies for JSON bodies from a request body's JSON schema (the subset pydantic
writes into /openapi.json: type, anyOf, const, enum, bounds, properties, items, refs inlined).

hypothesis-jsonschema would do this, but it no longer runs on current Hypothesis releases;
the fuzz test needs only this much. Arrays are kept short and free-form objects get keys a chat
message uses, so that some generated bodies get past validation and reach the engine.
"""

from hypothesis import strategies as st

SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
JSON = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# free-form objects (messages, tool parameters, template kwargs) draw their keys from these
KEYS = st.sampled_from(["role", "content", "name", "type", "text", "tool_calls"]) | st.text(
    max_size=8
)
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "developer"])


def from_schema(schema: dict) -> st.SearchStrategy:
    if not isinstance(schema, dict) or not schema:
        return JSON
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema.get("anyOf") or schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", None))
        high = schema.get("maximum", schema.get("exclusiveMaximum", None))
        return st.integers(
            None if low is None else int(low) + ("exclusiveMinimum" in schema),
            None if high is None else int(high) - ("exclusiveMaximum" in schema),
        )
    if kind == "number":
        return st.floats(
            schema.get("minimum", schema.get("exclusiveMinimum")),
            schema.get("maximum", schema.get("exclusiveMaximum")),
            allow_nan=False,
            allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=24)
    if kind == "array":
        low = schema.get("minItems", 0)
        return st.lists(
            from_schema(schema.get("items", {})),
            min_size=low,
            max_size=max(low, min(schema.get("maxItems", 3), 3)),
        )
    if kind == "object":
        return _object(schema)
    return JSON


def _object(schema: dict) -> st.SearchStrategy:
    properties = schema.get("properties") or {}
    if not properties:
        free = st.dictionaries(KEYS, JSON, max_size=4)
        message = st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=24)})
        return st.one_of(free, message)
    required = set(schema.get("required") or ())
    return st.fixed_dictionaries(
        {k: from_schema(v) for k, v in properties.items() if k in required},
        optional={k: from_schema(v) for k, v in properties.items() if k not in required},
    )
