"""Incremental detokenisation: whole characters only, and the same text as one decode."""

import pytest
from engine_fixtures import tiny_tokenizer

from qwen35_ray.engine.detokenizer import IncrementalDetokenizer

TEXT = "naïve café, 日本語のテキスト 🙂👍🏽 and <think>tags</think> ok"


class GenericTokenizer:
    """Only `decode`, as a tokenizer without a Rust backend would offer."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory)


@pytest.mark.parametrize("path", ["backend", "generic"])
def test_incremental_text_matches_full_decode(tokenizer, path, monkeypatch):
    ids = tokenizer.encode(TEXT)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    if path == "backend":
        # the fast tokenizer decodes through its backend, never through transformers' decode
        monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: pytest.fail("slow path"))
        detok = IncrementalDetokenizer(tokenizer)
    else:
        detok = IncrementalDetokenizer(GenericTokenizer(tokenizer))
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces), "a piece ends inside a character"
    # multi-byte characters span several byte-level tokens, so some pushes release nothing
    assert "" in pieces
    assert "".join(pieces) == expected
