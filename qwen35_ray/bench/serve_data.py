"""Workloads of `qwen35-ray bench serve`: synthetic prompts of an exact number of tokens of the
model's tokenizer, or conversations from a chat dataset file.

Dataset files are JSON Lines (one conversation a line) or one JSON array of them, in either of
two shapes:
- ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
- OpenAI messages: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
As vLLM's ShareGPT loader does, a conversation gives one request: its messages up to its first
user turn (a system message before it included) are the prompt, and the assistant reply after
that turn, when there is one, sets the output length (unless --output-len does).
"""

import json
import random
from pathlib import Path

from qwen35_ray.bench.serve_client import BenchRequest

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
ROLES.update(assistant="assistant", chatgpt="assistant", bing="assistant", bard="assistant")
DEFAULT_OUTPUT_LEN = 128


def load_tokenizer(name: str):
    """The tokenizer of an embedded model name, a checkpoint directory or a hub id (only its
    small files are fetched, never the weights)."""
    from transformers import AutoTokenizer

    from qwen35_ray.model.source import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(name, weights=False)))


def plain_token_ids(tok) -> list[int]:
    """Every id of the vocabulary but the special and added tokens (<|im_start|>, ...), which
    would make a random prompt something other than plain text, and the pieces of UTF-8
    characters (alone they decode to U+FFFD, whose re-encoding differs): random prompts of
    these ids read back as text of the same length."""
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    ids = [i for i in range(len(tok)) if i not in special]
    texts = tok.batch_decode([[i] for i in ids])
    return [i for i, text in zip(ids, texts) if "\ufffd" not in text]


def text_of_length(tok, ids: list[int], n: int, rng: random.Random, pool: list[int], tries=16):
    """(text, exact): text that the tokenizer encodes to exactly n tokens, found by decoding
    the ids, re-encoding, and trimming or topping up with random ids until it holds; exact is
    False if tries ran out (the text is then within a few tokens of n)."""
    text = ""
    for _ in range(tries):
        text = tok.decode(ids)
        again = tok.encode(text, add_special_tokens=False)
        if len(again) == n:
            return text, True
        ids = again[:n] if len(again) > n else again + rng.choices(pool, k=n - len(again))
    return text, False


def random_requests(
    tok, n: int, input_len: int, output_len: int, seed: int, route: str, as_text: bool
) -> tuple[list[BenchRequest], int]:
    """n prompts of input_len random plain tokens, fixed by the seed, and how many of them are
    not exactly input_len tokens. To /v1/completions they go as token ids (exact) unless
    as_text; to chat as the text of one user message (its input_len tokens, before the chat
    template adds its own)."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"--input-len {input_len} and --output-len {output_len} must be >= 1")
    rng = random.Random(seed)
    pool = plain_token_ids(tok)
    out, inexact = [], 0
    for _ in range(n):
        ids = rng.choices(pool, k=input_len)
        if route == "completions" and not as_text:
            out.append(BenchRequest(ids, None, input_len, output_len))
            continue
        text, exact = text_of_length(tok, ids, input_len, rng, pool)
        inexact += not exact
        length = len(tok.encode(text, add_special_tokens=False))
        if route == "chat":
            out.append(BenchRequest(None, [{"role": "user", "content": text}], length, output_len))
        else:
            out.append(BenchRequest(text, None, length, output_len))
    return out, inexact


def read_conversations(path: Path) -> list[list[dict]]:
    """The file's conversations as OpenAI messages, in file order."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    conversations = []
    for i, row in enumerate(rows, 1):
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            turns = [(m.get("role"), m.get("content")) for m in row["messages"]]
        elif isinstance(row, dict) and isinstance(row.get("conversations"), list):
            turns = [(ROLES.get(m.get("from")), m.get("value")) for m in row["conversations"]]
        else:
            raise ValueError(
                f"{path}: conversation {i} has neither a 'messages' nor a 'conversations' list "
                "(see `qwen35-ray bench serve -h` for the two shapes read)"
            )
        conversations.append(
            [{"role": r, "content": c} for r, c in turns if r and isinstance(c, str)]
        )
    return conversations


def first_exchange(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt messages up to the first user turn, the assistant reply after it or None)."""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            after = messages[i + 1] if i + 1 < len(messages) else None
            reply = after["content"] if after and after["role"] == "assistant" else None
            return [m for m in messages[: i + 1] if m["role"] in ("system", "user")], reply
    return [], None


class ChatDataset:
    """A dataset's usable requests in a seeded order, handed out n at a time; each sweep point
    gets the next n, so no two points send the same prompt while the dataset lasts (a repeated
    prompt would be served from the prefix cache). `reused` says whether it ran out."""

    def __init__(self, path, tok, route: str, output_len: int | None, max_len: int, seed: int):
        self.path, self.tok, self.route = Path(path), tok, route
        self.output_len, self.max_len = output_len, max_len
        self.conversations = read_conversations(self.path)
        random.Random(seed).shuffle(self.conversations)
        self.ready: list[BenchRequest] = []
        self.next_conversation = 0
        self.given = 0
        self.reused = False

    def _build(self, messages: list[dict]) -> BenchRequest | None:
        prompt, reply = first_exchange(messages)
        if not prompt:
            return None
        text = self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_len = len(self.tok.encode(text, add_special_tokens=False))
        out = self.output_len
        if out is None:
            out = DEFAULT_OUTPUT_LEN if reply is None else len(self.tok.encode(reply))
        if out < 1 or prompt_len + out > self.max_len:
            return None
        if self.route == "chat":
            return BenchRequest(None, prompt, prompt_len, out)
        return BenchRequest(text, None, prompt_len, out)

    def take(self, n: int) -> list[BenchRequest]:
        # built lazily: a large dataset is rendered only as far as the run needs
        while len(self.ready) < self.given + n and self.next_conversation < len(self.conversations):
            req = self._build(self.conversations[self.next_conversation])
            self.next_conversation += 1
            if req is not None:
                self.ready.append(req)
        if not self.ready:
            raise ValueError(
                f"{self.path} has no conversation with a user turn whose prompt and output fit "
                f"in --max-model-len {self.max_len}"
            )
        out = [self.ready[(self.given + i) % len(self.ready)] for i in range(n)]
        self.reused = self.reused or self.given + n > len(self.ready)
        self.given += n
        return out
