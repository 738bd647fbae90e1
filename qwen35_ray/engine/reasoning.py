"""thinking_token_budget: a sequence may write that many tokens inside `<think>`, then the
engine forces `</think>` in place of the token it samples next.

A sequence is inside reasoning when the last `<think>` of its prompt and output comes after the
last `</think>` (the chat template ends the prompt with `<think>\\n` when thinking is on). The
budget counts output tokens written inside reasoning. Forcing waits while the detokenizer holds
part of a UTF-8 character, so the reasoning text ends on a whole character; a character is at
most 4 bytes, so after MAX_WAIT more tokens it is forced whatever the bytes were.
"""

from dataclasses import dataclass

from qwen35_ray.engine.errors import RequestError

MAX_WAIT = 3


@dataclass(frozen=True)
class ThinkTokens:
    start: int  # <think>
    end: int  # </think>

    @classmethod
    def of(cls, tokenizer) -> "ThinkTokens | None":
        """The tokenizer's `<think>` and `</think>` ids, None when it has not both as tokens."""
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            return None
        return cls(*ids)

    def budget(self, prompt: list[int], output: list[int], limit: int) -> "ThinkingBudget":
        """The budget state of a sequence that has written `output` (an imported request
        arrives with tokens already generated)."""
        b = ThinkingBudget(self, limit, _inside(self, prompt))
        for t in output:
            b.observe(t, char_open=False)
        return b


@dataclass
class ThinkingBudget:
    """One sequence's place in its reasoning budget."""

    tokens: ThinkTokens
    left: int  # tokens still allowed inside reasoning; below 0 while a character completes
    inside: bool
    char_open: bool = False  # the detokenizer holds part of a character

    def observe(self, token: int, char_open: bool) -> None:
        """The sequence wrote token; char_open: its text now ends inside a character."""
        if token == self.tokens.start:
            self.inside = True
        elif token == self.tokens.end:
            self.inside = False
        elif self.inside:
            self.left -= 1
        self.char_open = char_open

    @property
    def forced(self) -> int | None:
        """The token the next sample must be replaced with, if any."""
        if not self.inside or self.left > 0:
            return None
        if self.char_open and self.left > -MAX_WAIT:
            return None
        return self.tokens.end


def _inside(tokens: ThinkTokens, ids: list[int]) -> bool:
    for t in reversed(ids):
        if t in (tokens.start, tokens.end):
            return t == tokens.start
    return False


def check_budget(tokens: ThinkTokens | None, budget: int | None) -> None:
    """RequestError for a thinking_token_budget this model cannot honour."""
    if budget is not None and tokens is None:
        raise RequestError(
            f"thinking_token_budget={budget} needs a model whose tokenizer has <think> and "
            "</think> tokens, and this one has not; drop thinking_token_budget"
        )
