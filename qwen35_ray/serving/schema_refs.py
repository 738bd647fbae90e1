"""`$ref`s in a tool's parameters, inlined.

`openai.pydantic_function_tool` and pydantic write a nested model as `{"$ref":
"#/$defs/Address"}` with the definitions at the parameters' root. A forced call compiles one
grammar per parameter and the parser types one parameter at a time, so each parameter's schema
must stand alone: its refs are replaced by what they point to. A recursive ref has no finite
inlining and is refused; so is an expansion that outgrows the schema size limit.
"""

import json

from qwen35_ray.serving.schema_limits import MAX_DEPTH, MAX_SCHEMA_BYTES, SCHEMA_ONE

# keys that describe a value without constraining it: a ref's sibling may override them
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated"}
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


def inline_refs(schema, root: dict, where: str):
    """schema with every local `$ref` (`#/$defs/X`, `#/definitions/X`, any `#/...` pointer
    into root) replaced by its target, and no `$defs`/`definitions` left; ValueError naming
    `where` for a recursive, dangling or non-local ref."""
    return _Inliner(root, where).inline(schema, (), 1)


class _Inliner:
    def __init__(self, root: dict, where: str):
        self.root, self.where = root, where
        self.budget = MAX_SCHEMA_BYTES

    def inline(self, node, refs: tuple[str, ...], depth: int):
        if not isinstance(node, dict):
            return node
        if depth > MAX_DEPTH:
            raise ValueError(
                f"{self.where}: with its $refs expanded the schema nests deeper than "
                f"{MAX_DEPTH} levels; flatten it"
            )
        if "$ref" in node:
            return self._expand(node, refs, depth)
        out = {}
        for key, value in node.items():
            if key in ("$defs", "definitions"):
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                value = {k: self.inline(v, refs, depth + 1) for k, v in value.items()}
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                value = [self.inline(v, refs, depth + 1) for v in value]
            elif key in SCHEMA_ONE:
                value = self.inline(value, refs, depth + 1)
            out[key] = value
        return out

    def _expand(self, node: dict, refs: tuple[str, ...], depth: int) -> dict:
        ref = node["$ref"]
        if ref in refs:
            raise ValueError(
                f"{self.where}: $ref {ref!r} is recursive, so its grammar would never end; "
                "unroll the recursion to a fixed depth"
            )
        target = self._target(ref)
        self.budget -= len(json.dumps(target, separators=(",", ":")))
        if self.budget < 0:
            raise ValueError(
                f"{self.where}: with its $refs expanded the schema is over {MAX_SCHEMA_BYTES} "
                "bytes; share fewer definitions"
            )
        out = self.inline(target, (*refs, ref), depth)
        if not isinstance(out, dict):
            # a boolean schema: `true` holds nothing to merge a sibling into
            out = {} if out else {"not": {}}
        siblings = self.inline({k: v for k, v in node.items() if k != "$ref"}, refs, depth)
        merged = dict(out)
        for key, value in siblings.items():
            if key in merged and merged[key] != value and key not in _ANNOTATIONS:
                raise ValueError(
                    f"{self.where}: {key!r} beside $ref {ref!r} differs from the definition's; "
                    "put it inside the definition"
                )
            merged[key] = value
        return merged

    def _target(self, ref):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(
                f"{self.where}: $ref {ref!r} is not local; only refs into the schema itself "
                "(#/$defs/...) are supported"
            )
        node = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise ValueError(f"{self.where}: $ref {ref!r} points to nothing in the schema")
        if not isinstance(node, (dict, bool)):
            raise ValueError(f"{self.where}: $ref {ref!r} points to something not a schema")
        return node
