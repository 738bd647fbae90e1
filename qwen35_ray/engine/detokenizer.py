"""Incremental detokenisation that never emits half a UTF-8 character.

Byte-level BPE can split one character over several tokens; until the rest arrives, decoding
ends in U+FFFD. Text is released only up to a clean boundary, decoding a short window of recent
tokens rather than the whole output each step.
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.skip = skip_special_tokens
        # a fast tokenizer without space clean-up decodes exactly as its Rust backend does;
        # calling the backend skips transformers' per-call argument handling (twice a token)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=self.skip)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=self.skip)
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens up to here have been emitted as text
        self.char_open = False  # the text ends inside a character (held back)

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (may be empty)."""
        self.ids.append(token_id)
        decode = self._decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        self.char_open = full.endswith("\ufffd")
        if self.char_open or len(full) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]
