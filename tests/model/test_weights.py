"""Loader: checkpoint layouts, dtypes, FP8 dequantisation and the errors a user sees."""

import json
import shutil

import pytest
import torch
from hf_reference import fuse_experts, hf_model, save
from safetensors.torch import load_file, save_file

from qwen35_ray.model.loader import load_model
from qwen35_ray.model.weights import CheckpointError, dequantize_fp8

PREFIX = "model.language_model.layers"


@pytest.fixture(scope="module")
def per_expert(tmp_path_factory):
    """transformers saves qwen3_5_moe with one tensor per expert (like the FP8 releases)."""
    path = save(hf_model("qwen3_5_moe"), tmp_path_factory.mktemp("per_expert"))
    assert f"{PREFIX}.0.mlp.experts.3.up_proj.weight" in load_file(path / "model.safetensors")
    return path


def rewrite(src, dst, edit, shards=1):
    """Copy a checkpoint with its tensors passed through `edit`, split into `shards` files."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = edit(load_file(src / "model.safetensors"))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors")
        return dst
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, dst / file)
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def params(path, **kw):
    model, _, _ = load_model(path, dtype=kw.pop("dtype", "float32"), progress=False, **kw)
    return dict(model.named_parameters())


def test_fused_and_per_expert_sharded_load_identically(per_expert, tmp_path):
    fused = rewrite(per_expert, tmp_path / "fused", fuse_experts, shards=3)
    assert (fused / "model.safetensors.index.json").exists()
    a, b = params(per_expert), params(fused)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "victim",
    [
        f"{PREFIX}.1.linear_attn.A_log",
        f"{PREFIX}.3.self_attn.k_norm.weight",
        "lm_head.weight",
        f"{PREFIX}.2.mlp.experts.5.up_proj.weight",
    ],
)
def test_missing_tensor_is_named(per_expert, tmp_path, victim):
    broken = rewrite(
        per_expert, tmp_path / "broken", lambda t: {n: v for n, v in t.items() if n != victim}
    )
    with pytest.raises(CheckpointError, match=f"missing tensor {victim.replace('.', '[.]')}"):
        params(broken)


def test_unexpected_tensor_is_named(per_expert, tmp_path):
    extra = f"{PREFIX}.0.linear_attn.surprise.weight"
    broken = rewrite(per_expert, tmp_path / "extra", lambda t: {**t, extra: torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor .*surprise"):
        params(broken)


def test_wrong_shape_is_named(per_expert, tmp_path):
    name = f"{PREFIX}.0.linear_attn.dt_bias"
    broken = rewrite(per_expert, tmp_path / "shape", lambda t: {**t, name: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="dt_bias has shape"):
        params(broken)


def test_bf16_load_rounds_the_fp32_weights(per_expert):
    a, b = params(per_expert), params(per_expert, dtype="bfloat16")
    for name in a:
        assert b[name].dtype == torch.bfloat16
        assert torch.equal(a[name].to(torch.bfloat16), b[name]), name


def quantize_fp8(w, block):
    """Block-wise e4m3 quantisation as the FP8 releases store it (weight, weight_scale_inv)."""
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    scale = torch.zeros(sr, sc)
    q = torch.zeros_like(w)
    for i in range(sr):
        for j in range(sc):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = tile / scale[i, j]
    return q.to(torch.float8_e4m3fn), scale


def test_fp8_block_checkpoint_is_dequantised(tmp_path):
    src = save(hf_model("qwen3_5"), tmp_path / "dense")
    block = 32
    expected = {}

    def quantize(tensors):
        out = {}
        for name, t in tensors.items():
            if name.endswith("proj.weight") and t.dim() == 2:
                q, s = quantize_fp8(t, block)
                out[name], out[name + "_scale_inv"] = q, s
                expected[name] = dequantize_fp8(q, s, (block, block))
            else:
                out[name] = t
        return out

    fp8 = rewrite(src, tmp_path / "fp8", quantize)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [block, block],
        "activation_scheme": "dynamic",
    }
    (fp8 / "config.json").write_text(json.dumps(config))
    got = params(fp8)
    assert len(expected) > 10
    for name, want in expected.items():
        ours = name.removeprefix("model.")
        assert torch.equal(got[ours], want), name
        # and the dequantised weight is close to the original (fp8 keeps ~2 significant digits)
    orig = params(src)
    w = "layers.0.linear_attn.in_proj_qkv.weight"
    assert (got[w] - orig[w]).abs().max() < 0.1 * orig[w].abs().max()


def offline_hub(monkeypatch, cache):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("Qwen/Qwen3.5-35B-A3B", progress=False)


def test_hub_id_offline_served_from_the_hub_cache(monkeypatch, tmp_path, per_expert):
    """A hub id that the local hub cache holds loads with no network (HF_HUB_OFFLINE=1)."""
    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(per_expert, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    offline_hub(monkeypatch, tmp_path / "hub")
    _, config, path = load_model("acme/tiny-moe", dtype="float32", progress=False)
    assert path == snapshot and config.family == "qwen3_5_moe"


def test_unknown_source_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        load_model("./no/such/dir", progress=False)
