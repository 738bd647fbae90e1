"""Child process of the RequestState tests: import a state into a fresh engine and decode."""

import sys
from pathlib import Path

from engine_fixtures import make_engine

from qwen35_ray.engine.request_state import RequestState


def decode(path: str, tokenizer_dir: str, blob: bytes) -> list[int]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    engine = make_engine(Path(path), tokenizer)
    state = RequestState.from_bytes(blob)
    engine.import_request(state)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    assert engine.cache_manager.is_empty
    return out.outputs[0].token_ids


if __name__ == "__main__":
    ckpt, tok, blob_file, out_file = sys.argv[1:]
    tokens = decode(ckpt, tok, Path(blob_file).read_bytes())
    Path(out_file).write_text(" ".join(map(str, tokens)))
