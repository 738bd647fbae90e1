"""Reading the rope settings of config.json (model/rope_config.py): the released Qwen3.5 configs
as they are and with the YaRN settings Qwen documents, YaRN's every option against the
frequencies and attention factor transformers computes from the same dict, and any other
rope_type refused with the field named."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from qwen35_kernels.rope import rope_inv_freq
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

from qwen35_ray.model.attention import rope_frequencies
from qwen35_ray.model.config import ModelConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "qwen35"
REAL = sorted((SHARED / "configs").glob("*.json")) + [SHARED / "config.dense-27b-fp8.json"]
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"reference configs {SHARED} absent: check out shared/ beside"
)
# what Qwen's model cards add to rope_parameters for up to 1,010,000 tokens
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}


def config_397b(**rope) -> dict:
    raw = json.loads((SHARED / "configs" / "Qwen3.5-397B-A17B.config.json").read_text())
    raw["text_config"]["rope_parameters"].update(rope)
    return raw


def transformers_rope(raw: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor) of transformers' Qwen3.5 text rotary embedding."""
    rotary = Qwen3_5MoeTextRotaryEmbedding(
        Qwen3_5MoeTextConfig(**copy.deepcopy(raw["text_config"]))
    )
    return rotary.inv_freq, rotary.attention_scaling


@needs_shared
@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_released_configs_load_with_plain_rope(path):
    c = ModelConfig.from_hf(path)
    assert c.rope_scaling is None
    assert (c.rope_theta, c.rotary_dim, c.context_len) == (10_000_000.0, 64, 262144)
    assert torch.equal(rope_frequencies(c), rope_inv_freq(64, 10_000_000.0))


@needs_shared
def test_qwen_documented_yarn_reaches_a_million_tokens():
    raw = config_397b(**QWEN_YARN)
    c = ModelConfig.from_dict(raw)
    s = c.rope_scaling
    assert (s.factor, s.original_max_position_embeddings) == (4.0, 262144)
    assert s.attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    assert c.context_len == 4 * 262144 >= 1_010_000
    inv_freq, attention_factor = transformers_rope(raw)
    assert torch.equal(rope_frequencies(c), inv_freq)
    assert s.attention_factor == attention_factor


@needs_shared
@pytest.mark.parametrize(
    "options",
    [
        {"truncate": False},
        {"beta_fast": 16, "beta_slow": 2},
        {"beta_fast": 0, "beta_slow": None},  # transformers' `or`: the defaults 32 and 1
        {"attention_factor": 1.25},
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"factor": 8.0, "original_max_position_embeddings": 32768},
        {"factor": None, "original_max_position_embeddings": 65536},  # max / original = 4
        {"original_max_position_embeddings": 4096, "rope_theta": 10000.0},
    ],
    ids=str,
)
def test_yarn_options_as_transformers_computes_them(options):
    raw = config_397b(**{**QWEN_YARN, **options})
    c = ModelConfig.from_dict(raw)
    inv_freq, attention_factor = transformers_rope(raw)
    assert torch.equal(rope_frequencies(c), inv_freq)
    assert c.rope_scaling.attention_factor == attention_factor


@needs_shared
def test_missing_original_length_is_max_position_embeddings():
    raw = config_397b(rope_type="yarn", factor=2.0)
    c = ModelConfig.from_dict(raw)
    assert c.rope_scaling.original_max_position_embeddings == 262144
    assert c.context_len == 524288
    assert torch.equal(rope_frequencies(c), transformers_rope(raw)[0])


@needs_shared
def test_top_level_original_length_wins_as_in_transformers():
    """Phi-3's layout: original_max_position_embeddings beside rope_parameters, not in it."""
    raw = config_397b(**QWEN_YARN)
    raw["text_config"]["original_max_position_embeddings"] = 131072
    c = ModelConfig.from_dict(raw)
    assert c.rope_scaling.original_max_position_embeddings == 131072
    assert torch.equal(rope_frequencies(c), transformers_rope(raw)[0])


@needs_shared
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "longrope", "llama3", "mrope"])
def test_other_rope_types_are_refused_by_name(rope_type):
    raw = config_397b(rope_type=rope_type, factor=2.0)
    with pytest.raises(
        ValueError, match=rf"text_config\.rope_parameters\.rope_type='{rope_type}' is not supported"
    ):
        ModelConfig.from_dict(raw)


def test_legacy_rope_scaling_is_read_and_refused_by_name():
    """Qwen3-Next's flat config keeps `rope_scaling` (transformers prefers it to
    rope_parameters); the old `type` key names the rope type there."""
    raw = {
        "model_type": "qwen3_next",
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 1,
        "linear_key_head_dim": 4,
        "linear_value_head_dim": 4,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default"},
        "rope_scaling": {"type": "yarn", "factor": 2.0},
    }
    c = ModelConfig.from_dict(raw)
    assert c.rope_scaling.factor == 2.0 and c.context_len == 2048
    raw["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match=r"rope_scaling\.type='dynamic' is not supported"):
        ModelConfig.from_dict(raw)


@needs_shared
def test_bad_yarn_settings_are_refused():
    with pytest.raises(ValueError, match=r"text_config\.rope_parameters\.factor=0\.5"):
        ModelConfig.from_dict(config_397b(**{**QWEN_YARN, "factor": 0.5}))
    raw = config_397b()
    raw["text_config"]["rope_parameters"] = {"full_attention": QWEN_YARN}
    with pytest.raises(ValueError, match="settings per layer type"):
        ModelConfig.from_dict(raw)
