"""Structured outputs: a grammar per sequence (xgrammar) that masks the tokens it cannot take.

A request's constraint is a JSON-serialisable spec, `SamplingParams.structured`, so it travels
with the request in a RequestState:

    {"type": "json_object"}                        any JSON object
    {"type": "json_schema", "schema": {...}}       JSON valid against the schema
    {"type": "grammar", "grammar": "root ::= ..."}  xgrammar EBNF
    {"type": "regex", "pattern": "..."}
    {"type": "structural_tag", "format": {...}}    xgrammar's structural-tag format

Any spec may add `"after": "</think>"` (a string that is one token): the output is free until
that token and follows the grammar from the next one on. A reasoning model thinks first,
unconstrained, and its answer is constrained. Free, except that the model may not stop: until
`after` the engine's stop (EOS) tokens are denied, so the answer the grammar asks for is written
unless the request runs out of tokens first ("length") or its own stop strings or stop token
ids end it.

JSON is generated compact (no free whitespace between tokens): whitespace is the easiest way
for a model to never finish. Every JSON grammar (json_object, json_schema, and each `json_schema`
value of a structural tag) is compiled from xgrammar's converted grammar with the characters of
its strings narrowed to what JSON allows unescaped (`strict_json_grammar`): no raw control
character (xgrammar 0.2's length-bounded strings let them through, and strict parsers refuse
them) and no surrogate (xgrammar takes their 3-byte forms, which are not UTF-8: each decodes as
U+FFFD, so the text has more characters than the grammar counted for maxLength). JSON sequences
are also denied every token with a control byte, which covers what the narrowing cannot reach
(a `pattern`'s regex).
The grammar's end is the engine's EOS tokens, so a sequence whose grammar is complete may only
stop, and it finishes with "stop" once it has.

Legend: B = sequences sampling in this step, V = model vocabulary (padded), W = ceil(V / 32).
"""

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xgrammar as xgr

KINDS = ("json_object", "json_schema", "grammar", "regex", "structural_tag")
JSON_KINDS = ("json_object", "json_schema")
# xgrammar prefixes its C++ errors with a time and a source location; the user needs neither
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# the characters of a string in xgrammar 0.2's converted grammar, with maxLength/minLength and
# without (both let surrogates through; the first, control characters too), and what JSON
# allows unescaped in a string
_LOOSE_BOUNDED = r"(([^\"\\\r\n]))"
_LOOSE_UNBOUNDED = r"[^\0-\x1f\"\\\r\n]"
_JSON_CHARACTER = r"[^\"\\\0-\x1f\uD800-\uDFFF]"
# a \u escape (four hex digits), and the same without D800-DFFF: a lone surrogate escape
# parses into a string no UTF-8 encoder takes
_LOOSE_U_ESCAPE = '("u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9])'
_JSON_U_ESCAPE = '("u" (([0-9A-Ca-cEFef] [A-Fa-f0-9]) | ([Dd] [0-7])) [A-Fa-f0-9] [A-Fa-f0-9])'


@dataclass
class Grammar:
    """One sequence's place in its grammar."""

    matcher: xgr.GrammarMatcher
    is_json: bool
    after: int | None = None  # the token that starts the grammar, until it is seen

    @property
    def active(self) -> bool:
        return self.after is None

    @property
    def waiting(self) -> bool:
        """Free output before `after`: any token but a stop token."""
        return self.after is not None

    def accept(self, token: int) -> bool:
        if self.after is not None:
            self.after = None if token == self.after else self.after
            return True
        return self.matcher.accept_token(token)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class StructuredOutputs:
    """One engine's grammar machinery: the tokenizer's vocabulary compiled once, a cache of
    compiled grammars keyed by spec, matchers per sequence and the batch's bitmask."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size=256):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._compiler: xgr.GrammarCompiler | None = None
        self._no_control: torch.Tensor | None = None  # [W] tokens without control bytes
        stops = set(stop_token_ids)
        # [W] every token but the stop ones
        self._no_stop = _pack([t not in stops for t in range(vocab_size)], vocab_size)
        self._compiled: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        # fills the next step's bitmasks while the model runs
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        """Built on first use: a large vocabulary takes seconds to compile."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
                self._no_control = _pack(
                    [not any(b < 0x20 for b in piece) for piece in info.decoded_vocab],
                    self.vocab_size,
                )
            return self._compiler

    def compile(self, spec: dict) -> xgr.CompiledGrammar:
        """The compiled grammar of spec; ValueError, saying what is wrong, for a bad spec."""
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiled = self._compile(spec)
        with self._lock:
            self._compiled[key] = compiled
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, spec: dict) -> xgr.CompiledGrammar:
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in KINDS:
            raise ValueError(f"structured output type {kind!r} is not one of {', '.join(KINDS)}")
        self._after(spec)
        c = self.compiler
        try:
            if kind == "json_object":
                return c.compile_grammar(strict_json_grammar({"type": "object"}))
            if kind == "json_schema":
                schema = spec.get("schema")
                if not isinstance(schema, (dict, bool)):
                    raise ValueError("a json_schema response format needs a 'schema' object")
                return c.compile_grammar(strict_json_grammar(schema))
            if kind == "grammar":
                return c.compile_grammar(spec["grammar"])
            if kind == "regex":
                return c.compile_regex(spec["pattern"])
            fmt = _strict_json_values(spec["format"])
            return c.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))
        except ValueError:
            raise
        except (RuntimeError, KeyError, TypeError) as e:
            message = _LOCATION.sub("", str(e).strip()).splitlines()[0]
            raise ValueError(f"invalid {kind} for structured output: {message}") from e

    def grammar(self, spec: dict, tokens: list[int] = ()) -> Grammar:
        """A fresh grammar state for spec, advanced over tokens already generated (an imported
        request); ValueError if those tokens do not follow the grammar."""
        g = Grammar(
            xgr.GrammarMatcher(self.compile(spec)), spec["type"] in JSON_KINDS, self._after(spec)
        )
        for i, t in enumerate(tokens):
            if not g.accept(t):
                raise ValueError(f"generated token {i} ({t}) does not follow the request's grammar")
        return g

    def _after(self, spec: dict) -> int | None:
        if spec.get("after") is None:
            return None
        ids = self.tokenizer.encode(spec["after"], add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"after={spec['after']!r} must be a single token of this model")
        return ids[0]

    def start_fill(self, grammars: list[Grammar | None]) -> Future | None:
        """Masks for the sequences about to sample (None: unconstrained), filled on the worker
        thread; None when no sequence is constrained now."""
        if all(g is None for g in grammars):
            return None
        return self._worker.submit(self._fill, grammars)

    def _fill(self, grammars: list[Grammar | None]) -> "Masks":
        bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        rows, failed = [], {}
        for i, g in enumerate(grammars):
            if g is None:
                continue
            if g.waiting:
                bitmask[i] = self._no_stop
                rows.append(i)
                continue
            # one sequence's broken matcher fails that sequence, not the step
            try:
                g.matcher.fill_next_token_bitmask(bitmask, i)
                rows.append(i)
            except Exception as e:
                failed[i] = e
        json_rows = [i for i in rows if grammars[i].is_json and not grammars[i].waiting]
        if json_rows:
            bitmask[json_rows] &= self._no_control
        return Masks(bitmask, rows, failed)


@dataclass(frozen=True)
class Masks:
    """One step's grammar masks."""

    bitmask: torch.Tensor  # [B, W]
    rows: list[int]  # the constrained rows whose mask is filled
    failed: dict[int, Exception]  # the constrained rows whose matcher raised, and why


def strict_json_grammar(schema) -> str:
    """EBNF for compact JSON valid against schema, its strings' characters only those JSON
    allows unescaped (no control character, no surrogate), and no surrogate escapes."""
    ebnf = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    ebnf = ebnf.replace(_LOOSE_BOUNDED, f"(({_JSON_CHARACTER}))")
    ebnf = ebnf.replace(_LOOSE_U_ESCAPE, _JSON_U_ESCAPE)
    return ebnf.replace(_LOOSE_UNBOUNDED, _JSON_CHARACTER)


def _strict_json_values(fmt):
    """A structural tag's format with each JSON value given as its `strict_json_grammar`."""
    if isinstance(fmt, list):
        return [_strict_json_values(f) for f in fmt]
    if not isinstance(fmt, dict):
        return fmt
    if fmt.get("type") == "json_schema" and fmt.get("style", "json") == "json":
        return {"type": "grammar", "grammar": strict_json_grammar(fmt.get("json_schema", True))}
    return {k: _strict_json_values(v) for k, v in fmt.items()}


def apply_bitmask(logits: torch.Tensor, masks: Masks) -> torch.Tensor:
    """logits [B, V] with the tokens each filled row's grammar forbids set to -inf (a copy; the
    model's own distribution stays for logprobs), on the logits' device: only the filled rows'
    packed words [b, W] travel there. Tokens past the bitmask's width stay as they are, as in
    xgrammar's apply_token_bitmask_inplace."""
    out = logits.clone()
    if not masks.rows:
        return out
    dev = logits.device
    V = min(logits.shape[-1], masks.bitmask.shape[-1] * 32)
    rows = torch.tensor(masks.rows, device=dev)
    words = masks.bitmask[masks.rows].to(dev)  # [b, W]
    shifts = torch.arange(32, dtype=words.dtype, device=dev)
    forbidden = ((words[:, :, None] >> shifts) & 1).flatten(1)[:, :V] == 0  # [b, V]
    out[rows, :V] = out[rows, :V].masked_fill(forbidden, -torch.inf)
    return out


def _pack(allowed: list[bool], vocab_size: int) -> torch.Tensor:
    """xgrammar's bitmask layout for one row: bit j of int32 word i is token 32 * i + j."""
    bits = torch.zeros(-(-vocab_size // 32) * 32, dtype=torch.int64)
    bits[: len(allowed)] = torch.tensor(allowed, dtype=torch.int64)
    words = (bits.view(-1, 32) << torch.arange(32)).sum(-1)
    return (words - (words >= 2**31) * 2**32).to(torch.int32)
