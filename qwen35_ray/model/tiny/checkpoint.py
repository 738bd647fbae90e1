"""Generate the embedded tiny Qwen3.5 checkpoints, byte for byte the same every time.

The files are in the hub layout of the real releases: nested `text_config`, text weights under
`model.language_model.`, routed experts fused (`mlp.experts.gate_up_proj` [E, 2I, H]), the MTP
head under `mtp.`, bf16 tensors, generation_config.json, preprocessor_config.json (the image
processor's settings) and tokenizer files with the chat template. Values come from one seeded
generator walking the parameters in name order.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.image_processor import QWEN35_PREPROCESSOR
from qwen35_ray.model.qwen35 import Qwen35ForCausalLM
from qwen35_ray.model.tiny.tokenizer import SPECIAL_TOKENS, write_tokenizer

SEED = 35

TEXT_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 8,
    "layer_types": ["linear_attention"] * 3
    + ["full_attention"]
    + ["linear_attention"] * 3
    + ["full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mamba_ssm_dtype": "float32",
    "mtp_num_hidden_layers": 1,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "dtype": "bfloat16",
}
MOE = {
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 128,
    "router_aux_loss_coef": 0.001,
}
DENSE = {"intermediate_size": 384}
VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "hidden_act": "gelu_pytorch_tanh",
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [],
}


def tiny_config(dense: bool, vocab_size: int, ids: dict[str, int]) -> dict:
    family = "qwen3_5" if dense else "qwen3_5_moe"
    text = {
        **TEXT_CONFIG,
        **(DENSE if dense else MOE),
        "model_type": f"{family}_text",
        "vocab_size": vocab_size,
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": None,
        "pad_token_id": None,
    }
    return {
        "architectures": [
            "Qwen3_5ForConditionalGeneration" if dense else "Qwen3_5MoeForConditionalGeneration"
        ],
        "model_type": family,
        "text_config": text,
        "vision_config": {**VISION, "model_type": family, "out_hidden_size": text["hidden_size"]},
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def preprocessor_config(vision: dict) -> dict:
    """preprocessor_config.json in the releases' form: their pixel bounds, mean and std, the
    classes transformers' Auto* loaders pick (the fast processor needs torchvision; without
    it transformers takes the Pillow one), patch geometry from the tower's config."""
    return {
        **QWEN35_PREPROCESSOR,
        "patch_size": vision["patch_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
    }


def _init(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Values that give a lively random model: unit-ish activations through every layer."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
    if name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
        return torch.ones(shape)
    if "norm" in name:
        return torch.randn(shape, generator=gen) * 0.1
    if name.endswith("conv1d.weight"):
        return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    fan_in = shape[-1]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def write_tiny(out_dir: Path, dense: bool) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_real = write_tokenizer(out_dir)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = (vocab_real + 63) // 64 * 64
    raw = tiny_config(dense, vocab_size, ids)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation, indent=2, sort_keys=True) + "\n"
    )
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(raw["vision_config"]), indent=2, sort_keys=True) + "\n"
    )
    config = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config, with_mtp=True)
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, p in sorted(model.named_parameters()):
        hub = (
            name
            if name.startswith("mtp.") or name == "lm_head.weight"
            else (config.weight_prefix + name)
        )
        tensors[hub] = _init(name, p.shape, gen).to(torch.bfloat16).contiguous()
    for name, shape in _vision_shapes(raw):
        tensors[f"model.visual.{name}"] = _init(name, shape, gen).to(torch.bfloat16).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def _vision_shapes(raw: dict) -> list[tuple[str, torch.Size]]:
    """Names and shapes of the (tiny) vision tower, so the checkpoint is complete for the
    multimodal classes of transformers. The engine serves text and skips these weights."""
    import transformers

    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        tower = transformers.AutoModel.from_config(config.vision_config)
    return sorted((n, p.shape) for n, p in tower.named_parameters())
