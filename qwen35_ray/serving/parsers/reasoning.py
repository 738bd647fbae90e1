"""ReasoningParser: splits Qwen3.5 output into reasoning_content and content, whole or streamed."""

from enum import Enum

from qwen35_ray.serving.parsers.tags import THINK_END, THINK_START, partial_tag_len


def prompt_ends_in_reasoning(prompt_text: str) -> bool:
    """True when the prompt leaves a `<think>` block open, so the output starts in reasoning.

    Qwen3.5's template ends the generation prompt with `<think>\\n` when thinking is on and
    with `<think>\\n\\n</think>\\n\\n` when `enable_thinking=False`.
    """
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


class _Mode(Enum):
    # Nothing but whitespace seen yet: the output may still open with `<think>`
    START = "start"
    REASONING = "reasoning"
    CONTENT = "content"


class ReasoningParser:
    """Splits one request's output at `</think>`.

    Newlines next to the tags are layout, not text, as in the chat template's own round trip:
    reasoning loses the newlines after `<think>` and before `</think>`, content the newlines
    after `</think>`. An output that never closes `</think>` (cut by max_tokens) is all
    reasoning. Once reasoning has closed, or content has started, tags are plain text.
    Values are None rather than "" so that callers can leave the field out of a delta.
    """

    def __init__(self, prompt_in_reasoning: bool):
        self.prompt_in_reasoning = prompt_in_reasoning
        self._mode = _Mode.REASONING if prompt_in_reasoning else _Mode.START
        self._buf = ""
        self._reasoning_started = False
        self._content_started = False

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; this parser's stream is untouched."""
        stream = ReasoningParser(self.prompt_in_reasoning)
        r1, c1 = stream.feed(text)
        r2, c2 = stream.flush()
        return _join(r1, r2), _join(c1, c2)

    def feed(self, delta_text: str) -> tuple[str | None, str | None]:
        """(reasoning_delta, content_delta) ready to send; a tag is never split across deltas."""
        self._buf += delta_text
        reasoning, content = [], []
        while self._buf:
            if self._mode is _Mode.START:
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK_START):
                    self._buf = stripped[len(THINK_START) :]
                    self._mode = _Mode.REASONING
                elif THINK_START.startswith(stripped):
                    break
                else:
                    self._mode = _Mode.CONTENT
            elif self._mode is _Mode.CONTENT:
                content.append(self._take_content(self._buf))
                self._buf = ""
            elif not self._step_reasoning(reasoning):
                break
        return _join(*reasoning), _join(*content)

    def flush(self) -> tuple[str | None, str | None]:
        """What was held back, at the end of the output."""
        text, self._buf = self._buf, ""
        if self._mode is _Mode.REASONING:
            return (text or None), None
        return None, (self._take_content(text) or None)

    def _step_reasoning(self, out: list[str]) -> bool:
        """Consumes reasoning from the buffer; False when the rest must wait for more text."""
        if not self._reasoning_started:
            self._buf = self._buf.lstrip("\n")
        end, start = self._buf.find(THINK_END), self._buf.find(THINK_START)
        if end >= 0 and (start < 0 or end < start):
            out.append(self._take_reasoning(self._buf[:end].rstrip("\n")))
            self._buf = self._buf[end + len(THINK_END) :]
            self._mode = _Mode.CONTENT
            return True
        if start >= 0:
            # A repeated `<think>` inside reasoning is noise; the text around it is kept
            out.append(self._take_reasoning(self._buf[:start]))
            self._buf = self._buf[start + len(THINK_START) :]
            return True
        hold = partial_tag_len(self._buf, THINK_END, THINK_START)
        body = self._buf[: len(self._buf) - hold]
        # Trailing newlines wait too: they are dropped if `</think>` follows them
        text = body.rstrip("\n")
        out.append(self._take_reasoning(text))
        self._buf = self._buf[len(text) :]
        return False

    def _take_reasoning(self, text: str) -> str:
        self._reasoning_started = self._reasoning_started or bool(text)
        return text

    def _take_content(self, text: str) -> str:
        if not self._content_started:
            text = text.lstrip("\n")
        self._content_started = self._content_started or bool(text)
        return text


def _join(*parts: str | None) -> str | None:
    return "".join(p for p in parts if p) or None
