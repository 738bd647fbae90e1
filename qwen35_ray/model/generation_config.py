"""A checkpoint's generation_config.json: default sampling values and extra stop ids."""

import json
from dataclasses import dataclass, field
from pathlib import Path

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class GenerationDefaults:
    sampling: dict = field(default_factory=dict)  # SamplingParams fields
    eos_token_ids: frozenset[int] = frozenset()

    @classmethod
    def read(cls, path: Path | None) -> "GenerationDefaults":
        file = Path(path) / "generation_config.json" if path else None
        if file is None or not file.exists():
            return cls()
        raw = json.loads(file.read_text())
        eos = raw.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls({k: raw[k] for k in SAMPLING_KEYS if k in raw}, frozenset(eos))
