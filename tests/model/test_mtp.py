"""MTP head: loaded from `mtp.` weights and checked against transformers' own decoder layer.

transformers ignores `mtp.` weights, so the oracle is assembled from its parts: its RMSNorm,
a Linear for `fc`, and its full-attention decoder layer holding the MTP layer's weights.
"""

import json
import math

import pytest
import torch
from hf_reference import fuse_experts, hf_model, save, text_model
from model_driver import Driver
from safetensors.torch import load_file, save_file
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as ref_mod

from qwen35_ray.model.loader import load_model


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory):
    ref = hf_model("qwen3_5_moe")
    path = save(ref, tmp_path_factory.mktemp("mtp"))
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    # the MTP layer is a full-attention MoE layer: borrow layer 3's shapes, fresh values
    gen = torch.Generator().manual_seed(7)
    tensors = load_file(path / "model.safetensors")
    H = ref.config.text_config.hidden_size
    mtp = {
        "mtp.fc.weight": torch.randn(H, 2 * H, generator=gen) / math.sqrt(2 * H),
        "mtp.pre_fc_norm_embedding.weight": 0.2 * torch.randn(H, generator=gen),
        "mtp.pre_fc_norm_hidden.weight": 0.2 * torch.randn(H, generator=gen),
        "mtp.norm.weight": 0.2 * torch.randn(H, generator=gen),
    }
    layer3 = "model.language_model.layers.3."
    for name, t in tensors.items():
        if name.startswith(layer3):
            mtp["mtp.layers.0." + name[len(layer3) :]] = torch.randn(t.shape, generator=gen) / (
                math.sqrt(t.shape[-1]) if t.dim() > 1 else 5.0
            )
    # the MTP experts in the BF16 release layout (fused), the main layers stay per expert
    mtp = fuse_experts(mtp)
    save_file({**tensors, **mtp}, path / "model.safetensors")
    return ref, path, mtp


@torch.no_grad()
def oracle(ref, mtp, ids, next_ids):
    cfg = ref.config.text_config
    lm = text_model(ref)
    hidden = lm(torch.tensor([ids])).last_hidden_state  # after the final norm
    norm = lambda key: _norm(cfg, mtp[f"mtp.{key}.weight"])
    x = torch.cat(
        [
            norm("pre_fc_norm_embedding")(lm.embed_tokens(torch.tensor([next_ids]))),
            norm("pre_fc_norm_hidden")(hidden),
        ],
        dim=-1,
    )
    x = x @ mtp["mtp.fc.weight"].T
    layer = ref_mod.Qwen3_5MoeDecoderLayer(cfg, layer_idx=3).float().eval()
    layer.load_state_dict(
        {k[len("mtp.layers.0.") :]: v for k, v in mtp.items() if k.startswith("mtp.layers.0.")}
    )
    L = len(ids)
    pos = torch.arange(L)[None]
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    x = layer(x, position_embeddings=lm.rotary_emb(x, pos), attention_mask=mask, position_ids=pos)
    return ref.lm_head(norm("norm")(x))[0]


def _norm(cfg, weight):
    n = ref_mod.Qwen3_5MoeRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    n.weight.data.copy_(weight)
    return n


def test_mtp_head_matches_reference_layers(with_mtp):
    ref, path, mtp = with_mtp
    ours, config, _ = load_model(path, dtype="float32", with_mtp=True, progress=False)
    assert config.mtp_num_hidden_layers == 1
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    next_ids = ids[1:] + [17]
    driver = Driver(ours, config, with_mtp=True)
    _, hidden, batch = driver.step({0: ids})
    draft = ours.compute_logits(
        ours.mtp_forward(torch.tensor(next_ids), hidden, batch, driver.cache)
    )
    torch.testing.assert_close(draft, oracle(ref, mtp, ids, next_ids), atol=1e-4, rtol=0)


def test_mtp_weights_skipped_unless_asked(with_mtp):
    _, path, _ = with_mtp
    model, _, _ = load_model(path, dtype="float32", progress=False)
    assert model.mtp is None
    assert not any(n.startswith("mtp.") for n, _ in model.named_parameters())


def test_mtp_head_output_at_rows_only(with_mtp):
    """A prompt's pass (engine/spec_draft.py) asks for the head's output at the last position
    alone: the MoE runs there, the K/V is written at every position as by the full pass."""
    ref, path, mtp = with_mtp
    ours, config, _ = load_model(path, dtype="float32", with_mtp=True, progress=False)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    next_ids = ids[1:] + [23]
    head_kv = len(config.attention_layers)  # the head's cache index
    runs = {}
    for rows in (None, torch.tensor([39, 7])):
        driver = Driver(ours, config, with_mtp=True)
        _, hidden, batch = driver.step({0: ids})
        out = ours.mtp_forward(torch.tensor(next_ids), hidden, batch, driver.cache, rows)
        kv = driver.cache.key[head_kv].clone(), driver.cache.value[head_kv].clone()
        runs[rows is None] = out, kv
    (full, full_kv), (some, some_kv) = runs[True], runs[False]
    assert some.shape == (2, config.hidden_size)
    torch.testing.assert_close(some, full[[39, 7]], atol=1e-5, rtol=0)
    assert torch.equal(some_kv[0], full_kv[0]) and torch.equal(some_kv[1], full_kv[1])
    assert full_kv[0].abs().sum() > 0
    expect = oracle(ref, mtp, ids, next_ids)[[39, 7]]
    torch.testing.assert_close(ours.compute_logits(some), expect, atol=1e-4, rtol=0)
    # no rows: the K/V is still written, nothing is returned
    driver = Driver(ours, config, with_mtp=True)
    _, hidden, batch = driver.step({0: ids})
    none = ours.mtp_forward(
        torch.tensor(next_ids), hidden, batch, driver.cache, torch.tensor([], dtype=torch.long)
    )
    assert none.shape == (0, config.hidden_size)
    assert torch.equal(driver.cache.key[head_kv], full_kv[0])
