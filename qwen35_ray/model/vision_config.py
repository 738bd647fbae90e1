"""The vision tower's settings, read from config.json's `vision_config` as transformers'
`Qwen3_5VisionConfig` reads them. A field the tower does not honour is an error naming it
rather than a silently different model: Qwen3.5 has no deepstack (Qwen3-VL's features taken
from middle blocks), so `deepstack_visual_indexes` must be empty.
"""

import json
from dataclasses import dataclass
from pathlib import Path

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}
HONOURED = {
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings",
    "hidden_act", "rope_parameters", "deepstack_visual_indexes",
}  # fmt: skip
# bookkeeping that does not change what the tower computes
INERT = {
    "model_type", "initializer_range", "dtype", "torch_dtype", "transformers_version",
    "architectures", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
}  # fmt: skip


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        return round(self.num_position_embeddings**0.5)

    @classmethod
    def from_dict(cls, raw: dict) -> "VisionConfig":
        """From config.json's `vision_config`; a field the tower does not honour is an error."""
        unknown = sorted(set(raw) - HONOURED - INERT)
        if unknown:
            raise ValueError(
                f"vision_config.{unknown[0]} is not honoured by this vision tower "
                f"(qwen35_ray/model/vision.py); remove it or serve text only"
            )
        if raw.get("deepstack_visual_indexes"):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes={raw['deepstack_visual_indexes']} asks "
                "for deepstack features, which Qwen3.5 does not use and this tower does not "
                "compute; it must be empty"
            )
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(
                f"vision_config.rope_parameters.rope_type={rope['rope_type']!r} is not "
                "supported; the vision tower's rotary embedding is 'axial'"
            )
        plain = HONOURED - {"rope_parameters", "deepstack_visual_indexes"}
        config = cls(**{k: raw[k] for k in plain if k in raw} | _theta(rope))
        for name in ("patch_size", "temporal_patch_size"):
            if not isinstance(getattr(config, name), int):
                raise ValueError(f"vision_config.{name}={getattr(config, name)!r} must be an int")
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"vision_config.hidden_act={config.hidden_act!r} is not supported; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        if config.grid_side**2 != config.num_position_embeddings:
            raise ValueError(
                f"vision_config.num_position_embeddings={config.num_position_embeddings} "
                "must be a square (the position table is side x side)"
            )
        return config

    @classmethod
    def from_hf(cls, path: str | Path) -> "VisionConfig":
        """From a checkpoint directory's config.json."""
        raw = json.loads((Path(path) / "config.json").read_text())
        if "vision_config" not in raw:
            raise ValueError(f"{path}/config.json has no vision_config: a text-only checkpoint")
        return cls.from_dict(raw["vision_config"])


def _theta(rope: dict) -> dict:
    return {"rope_theta": float(rope["rope_theta"])} if "rope_theta" in rope else {}
