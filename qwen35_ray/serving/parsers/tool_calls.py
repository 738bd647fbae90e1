"""ToolCallParser: qwen3_coder XML tool calls out of Qwen3.5 content, whole or streamed.

The format, as the chat template documents it (several blocks may follow each other):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>
"""

import json
import random
import re
import secrets
from typing import Any, Literal

from qwen35_ray.serving.parsers.arguments import convert_value
from qwen35_ray.serving.parsers.tags import TOOL_CALL_END, TOOL_CALL_START, partial_tag_len
from qwen35_ray.serving.schema_refs import inline_refs

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*)</function>\s*", re.S)
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>", re.S)

ContentEvent = tuple[Literal["content"], str]
ToolCallEvent = tuple[Literal["tool_call"], int, dict[str, Any]]
Event = ContentEvent | ToolCallEvent


class ToolCallParser:
    """Splits one request's content into text and OpenAI tool calls.

    A block that does not parse (unclosed, no `</function>`, text between parameters) is
    given back as content, exactly as written: the client sees what the model said rather
    than an error. Whitespace between content and a call, between calls and after the last
    call is layout and dropped. Without `seed`, call ids are random like vLLM's
    (`call_` + 24 hex); a seed makes them reproducible for tests.
    """

    def __init__(self, tools: list[dict] | None, seed: int | None = None):
        self.tools = tools
        self._schemas = _parameter_schemas(tools)
        self._rng = random.Random(seed) if seed is not None else None
        self._buf = ""
        # The buffer starts with `_ws_len` whitespace characters and then `<tool_call>`
        self._in_block = False
        self._ws_len = 0
        self._index = 0
        self._after_call = False

    def parse(self, content: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content without the calls, calls) of a whole message; the stream is untouched."""
        stream = ToolCallParser(self.tools)
        # Shares the id source, so ids stay unique across parse() calls on one parser
        stream._rng = self._rng
        events = stream.feed(content) + stream.flush()
        text = "".join(e[1] for e in events if e[0] == "content") or None
        return text, [e[2] for e in events if e[0] == "tool_call"]

    def feed(self, delta_text: str) -> list[Event]:
        """Events ready to send: `("content", text)`, `("tool_call", index, call)`.

        A call is emitted whole once its `</tool_call>` arrives; text that may open
        `<tool_call>` waits until the next delta tells.
        """
        self._buf += delta_text
        events: list[Event] = []
        while self._buf:
            step = self._step_block if self._in_block else self._step_text
            if not step(events):
                break
        return events

    def flush(self) -> list[Event]:
        """What was held back, at the end of the output; an unclosed block is content."""
        text, self._buf, self._in_block = self._buf, "", False
        if not text or (self._after_call and not text.strip()):
            return []
        return [("content", text)]

    def _step_text(self, events: list[Event]) -> bool:
        start = self._buf.find(TOOL_CALL_START)
        if start >= 0:
            self._emit_text(events, self._buf[:start].rstrip())
            self._in_block = True
            return True
        hold = partial_tag_len(self._buf, TOOL_CALL_START)
        # Trailing whitespace waits too: it is dropped if a call follows it
        self._emit_text(events, self._buf[: len(self._buf) - hold].rstrip())
        return False

    def _step_block(self, events: list[Event]) -> bool:
        body_start = self._ws_len + len(TOOL_CALL_START)
        end = self._buf.find(TOOL_CALL_END, body_start)
        again = self._buf.find(TOOL_CALL_START, body_start)
        if again >= 0 and (end < 0 or again < end):
            # Another block opened before this one closed: this one is text
            self._emit_text(events, self._buf[:again].rstrip())
            return True
        if end < 0:
            return False
        block_end = end + len(TOOL_CALL_END)
        call = self._parse_block(self._buf[body_start:end])
        if call is None:
            self._emit_text(events, self._buf[:block_end])
        else:
            events.append(("tool_call", self._index, call))
            self._index += 1
            self._after_call = True
            self._buf = self._buf[block_end:]
        self._in_block = False
        return True

    def _emit_text(self, events: list[Event], text: str) -> None:
        """Sends the buffer's first len(text) characters; the rest starts the next block."""
        self._buf = self._buf[len(text) :]
        self._ws_len = len(self._buf) - len(self._buf.lstrip())
        if text:
            events.append(("content", text))
            self._after_call = False

    def _parse_block(self, body: str) -> dict[str, Any] | None:
        function = _FUNCTION.fullmatch(body)
        name = function.group(1).strip() if function else ""
        if not name:
            return None
        inner, pos = function.group(2), 0
        schemas = self._schemas.get(name, {})
        arguments = {}
        while parameter := _PARAMETER.match(inner, pos):
            value = parameter.group(2)
            # A `<parameter=` inside a value means a `</parameter>` went missing
            if "<parameter=" in value:
                return None
            key = parameter.group(1).strip()
            arguments[key] = convert_value(_strip_one_newline(value), schemas.get(key))
            pos = parameter.end()
        if inner[pos:].strip():
            return None
        return {
            "id": self._new_id(),
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
        }

    def _new_id(self) -> str:
        hex24 = f"{self._rng.getrandbits(96):024x}" if self._rng else secrets.token_hex(12)
        return f"call_{hex24}"


def _strip_one_newline(value: str) -> str:
    # The template writes `<parameter=k>\n` + value + `\n</parameter>`; other newlines are data
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _parameter_schemas(tools: list[dict] | None) -> dict[str, dict[str, dict]]:
    """Tool name -> parameter name -> JSON schema, from OpenAI tool definitions, with `$ref`s
    inlined as the forced-call grammar has them (a ref that cannot be is left as written)."""
    schemas = {}
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        schemas[function["name"]] = {
            key: _inlined(schema, parameters)
            for key, schema in (properties if isinstance(properties, dict) else {}).items()
        }
    return schemas


def _inlined(schema, root: dict):
    try:
        return inline_refs(schema, root, "parameter")
    except (ValueError, RecursionError):
        return schema
