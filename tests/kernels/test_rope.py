"""apply_rope with YaRN frequencies and attention factor against transformers' Qwen3.5 rotary
embedding (interleaved M-RoPE with text positions) and apply_rotary_pos_emb: equal bit for bit,
in fp32 and bf16, at positions far past the original context."""

import pytest
import torch
import transformers
from qwen35_kernels.rope import apply_rope, yarn_inv_freq
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5TextRotaryEmbedding,
    apply_rotary_pos_emb,
)

# head_dim 256 with a quarter rotated, as in every Qwen3.5; 63 odd positions up to 1e6
D, T, H = 256, 63, 3
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}


def rotary(**rope) -> Qwen3_5TextRotaryEmbedding:
    rope_parameters = {
        "rope_theta": 10_000_000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
        **rope,
    }
    config = transformers.Qwen3_5TextConfig(head_dim=D, rope_parameters=rope_parameters)
    return Qwen3_5TextRotaryEmbedding(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [YARN, {"rope_type": "default"}], ids=["yarn", "default"])
def test_apply_rope_matches_transformers(dtype, rope):
    gen = torch.Generator().manual_seed(42)
    positions = torch.randint(0, 1_000_000, (T,), generator=gen).sort().values
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    emb = rotary(**rope)
    cos, sin = emb(q, positions[None])  # [1, T, R]
    expected, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    expected = expected[0].transpose(0, 1)
    if rope["rope_type"] == "yarn":
        inv_freq = yarn_inv_freq(64, 10_000_000.0, 4.0, 262144)
        assert torch.equal(inv_freq, emb.inv_freq)
    else:
        inv_freq = emb.inv_freq
    got = apply_rope(q, positions, inv_freq, emb.attention_scaling)
    assert torch.equal(got, expected)


def test_yarn_keeps_fast_and_divides_slow_frequencies():
    """Frequencies turning more than beta_fast times over the original length are kept, those
    turning fewer than beta_slow times are divided by the factor, a ramp joins them."""
    plain = 1.0 / (10_000.0 ** (torch.arange(0, 64, 2).float() / 64))
    yarn = yarn_inv_freq(64, 10_000.0, 4.0, 4096)
    turns = plain * 4096 / (2 * torch.pi)
    kept, divided = turns > 32, turns < 1
    assert torch.equal(yarn[kept], plain[kept])
    torch.testing.assert_close(yarn[divided], plain[divided] / 4)
    between = ~kept & ~divided
    assert ((yarn[between] < plain[between]) & (yarn[between] > plain[between] / 4)).all()
