"""The rotary embedding a checkpoint's config.json asks for, read as transformers reads it.

The rope settings live in `rope_parameters` (Qwen3.5, under `text_config`) or in the older
`rope_scaling` (Qwen3-Next; transformers prefers it when both are set). `rope_type` selects the
frequencies:
- `default` (or no rope_type): plain RoPE, `1 / rope_theta^(2i/R)`;
- `yarn`: what Qwen documents for contexts past the native 262,144 tokens (`factor` 4,
  `original_max_position_embeddings` 262144, up to 1,010,000 tokens): YaRN frequencies
  (`qwen35_kernels.rope.yarn`) and an attention factor that multiplies cos and sin,
  `0.1 ln(factor) + 1` unless the config gives `attention_factor` (or `mscale` and
  `mscale_all_dim`, DeepSeek's form).
Any other rope_type (linear, dynamic, longrope, llama3, ...) is refused at load with an error
naming the field: serving it with plain RoPE would give wrong tokens without a word.

The context a YaRN checkpoint serves is `factor x original_max_position_embeddings` (vLLM's
rule), which `ModelConfig.context_len` reports; otherwise `max_position_embeddings`.
"""

import math
from dataclasses import dataclass

SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN's parameters, resolved: every default and derived value already filled in."""

    rope_type: str  # "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    truncate: bool
    attention_factor: float  # multiplies cos and sin

    @property
    def context_len(self) -> int:
        return int(self.factor * self.original_max_position_embeddings)


def rope_settings(raw: dict, text: dict) -> tuple[dict, str]:
    """(the rope dict, its name in config.json for error messages)."""
    nested = "text_config." if text is not raw else ""
    for key in ("rope_scaling", "rope_parameters"):
        if text.get(key):
            return text[key], nested + key
    return {}, nested + "rope_parameters"


def read_rope_scaling(rope: dict, where: str, text: dict) -> RopeScaling | None:
    """None for plain RoPE, the resolved YaRN parameters for `yarn`; ValueError otherwise."""
    per_layer = [k for k in rope if k in set(text.get("layer_types") or ())]
    if per_layer:
        raise ValueError(
            f"{where} has settings per layer type ({', '.join(per_layer)}), which this engine "
            "does not honour; give one rope_parameters for every layer"
        )
    key = "rope_type" if "rope_type" in rope else "type"
    rope_type = rope.get(key, "default")
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(
            f"{where}.{key}={rope_type!r} is not supported; supported rope types: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}. Serve a checkpoint with one of these, or "
            "remove the rope scaling from its config.json to run at its native context"
        )
    max_pos = text.get("max_position_embeddings", 32768)
    # transformers gives a top-level original_max_position_embeddings priority over the dict's
    original = int(
        text.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings")
        or max_pos
    )
    factor = rope.get("factor")
    # DeepSeek-V3's form: the factor is the ratio of the two lengths
    factor = max_pos / original if factor is None else factor
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"{where}.factor={factor!r} must be a number of at least 1")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
    return RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=original,
        # transformers' `or`: a 0 or null means the paper's default
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        truncate=bool(rope.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
