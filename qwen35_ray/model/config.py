"""ModelConfig: the facts of a Qwen3.5 or Qwen3-Next checkpoint, read from its config.json.

Three layouts are understood:
- `qwen3_5` / `qwen3_5_moe`: multimodal wrapper, text settings nested under `text_config`,
  text weights under `model.language_model.`;
- `qwen3_5_text` / `qwen3_5_moe_text`: the text model saved on its own, weights under `model.`;
- `qwen3_next`: flat config, weights under `model.`, GDN projections fused
  (`in_proj_qkvz`, `in_proj_ba`).

RoPE settings (`rope_parameters` / `rope_scaling`: plain or YaRN, any other rope_type refused)
are read by `rope_config.py`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from qwen35_ray.model.rope_config import RopeScaling, read_rope_scaling, rope_settings

FAMILIES = {
    "qwen3_5": ("qwen3_5", "model.language_model."),
    "qwen3_5_moe": ("qwen3_5_moe", "model.language_model."),
    "qwen3_5_text": ("qwen3_5", "model."),
    "qwen3_5_moe_text": ("qwen3_5_moe", "model."),
    "qwen3_next": ("qwen3_next", "model."),
}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # qwen3_5 (dense), qwen3_5_moe or qwen3_next
    weight_prefix: str  # where the text weights live in the checkpoint
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]  # "linear_attention" (GDN) or "full_attention" per layer
    moe_layers: tuple[bool, ...]  # per layer: sparse MoE (True) or dense MLP
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    rms_norm_eps: float
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    intermediate_size: int  # dense MLP width (0 when every layer is MoE)
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    mtp_num_hidden_layers: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    dtype: str  # the checkpoint's dtype name, e.g. "bfloat16"
    fp8_block_size: tuple[int, int] | None  # FP8 block-quantised weights, dequantised on load
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; else YaRN's parameters
    # a checkpoint with a vision tower: the <|image_pad|> token and the rotary frequencies per
    # (t, h, w) axis of multimodal RoPE (model/mrope.py); None for a text-only checkpoint
    image_token_id: int | None = None
    mrope_section: tuple[int, int, int] | None = None

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def context_len(self) -> int:
        """The longest sequence the checkpoint's positions serve: factor x
        original_max_position_embeddings under YaRN, else max_position_embeddings."""
        if self.rope_scaling is not None:
            return self.rope_scaling.context_len
        return self.max_position_embeddings

    def describe_context(self) -> str:
        """Where context_len comes from, for error messages."""
        s = self.rope_scaling
        if s is None:
            return f"max_position_embeddings={self.max_position_embeddings}"
        return (
            f"YaRN factor {s.factor:g} x original_max_position_embeddings "
            f"{s.original_max_position_embeddings}"
        )

    @property
    def conv_dim(self) -> int:
        key_dim = self.linear_num_key_heads * self.linear_key_head_dim
        return 2 * key_dim + self.linear_num_value_heads * self.linear_value_head_dim

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        return cls.from_dict(json.loads(file.read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(
                f"model_type={model_type!r} is not a Qwen3.5 or Qwen3-Next checkpoint; "
                f"supported: {', '.join(FAMILIES)}"
            )
        family, prefix = FAMILIES[model_type]
        text = raw.get("text_config", raw)
        n = text["num_hidden_layers"]
        layer_types = text.get("layer_types") or [
            "full_attention"
            if (i + 1) % text.get("full_attention_interval", 4) == 0
            else "linear_attention"
            for i in range(n)
        ]
        rope, rope_field = rope_settings(raw, text)
        rope_scaling = read_rope_scaling(rope, rope_field, text)
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        num_experts = text.get("num_experts", 0) if family != "qwen3_5" else 0
        sparse_step = text.get("decoder_sparse_step", 1)
        mlp_only = set(text.get("mlp_only_layers") or [])
        moe_layers = [
            num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0 for i in range(n)
        ]
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        quant = raw.get("quantization_config") or {}
        fp8_block = None
        if quant.get("quant_method") == "fp8":
            fp8_block = tuple(quant.get("weight_block_size") or (128, 128))
        elif quant:
            raise ValueError(
                f"quantization method {quant.get('quant_method')!r} is not supported; "
                "use a bf16, fp32 or fp8 (block-quantised) checkpoint"
            )
        return cls(
            family=family,
            weight_prefix=prefix,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            layer_types=tuple(layer_types),
            moe_layers=tuple(moe_layers),
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            linear_num_key_heads=text["linear_num_key_heads"],
            linear_num_value_heads=text["linear_num_value_heads"],
            linear_key_head_dim=text["linear_key_head_dim"],
            linear_value_head_dim=text["linear_value_head_dim"],
            linear_conv_kernel_dim=text.get("linear_conv_kernel_dim", 4),
            intermediate_size=text.get("intermediate_size", 0) or 0,
            num_experts=num_experts,
            num_experts_per_tok=text.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=text.get("moe_intermediate_size", 0) if num_experts else 0,
            shared_expert_intermediate_size=(
                text.get("shared_expert_intermediate_size", 0) if num_experts else 0
            ),
            norm_topk_prob=text.get("norm_topk_prob", True),
            mtp_num_hidden_layers=text.get("mtp_num_hidden_layers", 0),
            tie_word_embeddings=raw.get(
                "tie_word_embeddings", text.get("tie_word_embeddings", False)
            ),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            eos_token_ids=tuple(eos),
            dtype=str(text.get("dtype") or text.get("torch_dtype") or "bfloat16"),
            fp8_block_size=fp8_block,
            rope_scaling=rope_scaling,
            image_token_id=raw.get("image_token_id") if "vision_config" in raw else None,
            # transformers' default when rope_parameters names none
            mrope_section=(
                tuple(rope.get("mrope_section", (11, 11, 10))) if "vision_config" in raw else None
            ),
        )
