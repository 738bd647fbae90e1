"""A CRD's openAPIV3Schema as the Kubernetes API server applies it, for jsonschema: defaults
filled in first, then validation that also refuses what the server would drop without a word.

The KubeRay CRDs are structural schemas: the API server prunes any field the schema does not
name (no x-kubernetes-preserve-unknown-fields anywhere in them), so a misspelt key is accepted
and silently lost. `strict_schema` turns that into an error (additionalProperties: false on
every object that lists its properties). `list_errors` checks x-kubernetes-list-type (map keys
and set items unique), which jsonschema does not know; the other x-kubernetes-* keywords are
ignored, as jsonschema ignores unknown keywords.
"""

import copy
from pathlib import Path

import jsonschema
import yaml

INT32 = (-(2**31), 2**31 - 1)
# the API server validates a custom resource's metadata as ObjectMeta; the CRD leaves it open.
# The fields a manifest in this repo may set:
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def crd_schema(path: Path, version: str = "v1") -> dict:
    """spec.versions[name=version].schema.openAPIV3Schema of a CRD file."""
    crd = yaml.safe_load(path.read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict, value):
    """`value` with every absent property that has a `default` set to it, recursively through
    objects, additionalProperties and array items (as the API server defaults on create)."""
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict, value):
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value.keys() - schema.get("properties", {}).keys():
                _default(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def strict_schema(schema: dict) -> dict:
    """A copy in which an object refuses keys its schema does not name, and `nullable` allows
    null (OpenAPI 3.0's spelling, which jsonschema does not read)."""
    out = copy.deepcopy(schema)
    _strict(out)
    out["properties"]["metadata"] = OBJECT_META
    return out


def _strict(node: dict):
    if node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        # an object with neither properties nor additionalProperties keeps nothing at all
        node.setdefault("additionalProperties", False)
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    for sub in node.get("properties", {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _strict(node[key])
    for sub in node.get("anyOf", []):
        _strict(sub)


_formats = jsonschema.FormatChecker()


@_formats.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or INT32[0] <= value <= INT32[1]


def schema_errors(schema: dict, doc: dict) -> list[str]:
    """Every violation of the (strict) schema, as 'path: message'."""
    validator = jsonschema.Draft7Validator(schema, format_checker=_formats)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def list_errors(schema: dict, value, path: str = "") -> list[str]:
    """x-kubernetes-list-type: `map` items unique by their x-kubernetes-list-map-keys, `set`
    items unique; the API server refuses duplicates."""
    out = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = props.get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                out += list_errors(sub, item, f"{path}/{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen = [tuple(item.get(k) for k in keys) for item in value]
        elif kind == "set":
            seen = [yaml.safe_dump(item) for item in value]
        else:
            seen = []
        dupes = {s for s in seen if seen.count(s) > 1}
        if dupes:
            out.append(f"{path}: duplicate items {sorted(map(str, dupes))} in a list-type {kind}")
        for i, item in enumerate(value):
            out += list_errors(schema["items"], item, f"{path}/{i}")
    return out


def crd_errors(schema: dict, doc: dict) -> list[str]:
    """What the API server would refuse (or silently drop) of `doc`, defaults applied first."""
    doc = apply_defaults(schema, doc)
    return schema_errors(strict_schema(schema), doc) + list_errors(schema, doc)
