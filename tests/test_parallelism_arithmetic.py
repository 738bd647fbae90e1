"""scripts/parallelism_arithmetic.py and qwen35_ray/deploy/sizing.py: the numbers quoted in
docs/parallelism.md. The parameter list must be the model's own, tensor by tensor, and the
397B figures must agree with arithmetic done here by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from qwen35_ray.deploy.sizing import Hardware, plan, text_tensors, vision_params
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.qwen35 import Qwen35ForCausalLM
from qwen35_ray.model.tiny.checkpoint import tiny_config
from qwen35_ray.model.tiny.tokenizer import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "parallelism_arithmetic.py"
CONFIG_397B = (
    ROOT.parent / "shared" / "data" / "qwen35" / "configs" / "Qwen3.5-397B-A17B.config.json"
)
needs_397b = pytest.mark.skipif(
    not CONFIG_397B.exists(), reason=f"reference config {CONFIG_397B} absent (../shared/data)"
)


def tiny_raw(dense: bool) -> dict:
    return tiny_config(dense, 1024, {t: i for i, t in enumerate(SPECIAL_TOKENS)})


def model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config, with_mtp=True)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def run_script(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_tensors_are_the_models_parameters(dense):
    config = ModelConfig.from_dict(tiny_raw(dense))
    counted = {t.name: t.shape for t in text_tensors(config, mtp=True)}
    assert counted == model_shapes(config)


@needs_397b
def test_397b_tensors_are_the_models_parameters():
    config = ModelConfig.from_hf(CONFIG_397B)
    counted = {t.name: t.shape for t in text_tensors(config, mtp=True)}
    assert counted == model_shapes(config)


def vision_tower_params(raw: dict) -> int:
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        tower = transformers.AutoModel.from_config(config.vision_config)
    return sum(p.numel() for p in tower.parameters())


def test_vision_count_matches_transformers_tower():
    raw = tiny_raw(dense=False)
    assert vision_params(raw["vision_config"]) == vision_tower_params(raw)


@needs_397b
def test_397b_vision_count_matches_transformers_tower():
    raw = json.loads(CONFIG_397B.read_text())
    assert vision_params(raw["vision_config"]) == vision_tower_params(raw)


@needs_397b
def test_397b_on_two_nodes_of_eight_at_ep16_by_hand():
    p = run_script("--config", str(CONFIG_397B))
    H, E, k, I, moe_layers = 4096, 512, 10, 1024, 60
    params = p["params"]
    # the advertised sizes, read from the file name, within a few percent
    assert params["advertised_total"] == 397e9 and params["advertised_active"] == 17e9
    assert abs(params["total"] / 397e9 - 1) < 0.02
    assert abs(params["text_active"] / 17e9 - 1) < 0.05
    routed = moe_layers * E * 3 * H * I
    assert params["routed_experts"] == routed

    gpu = p["per_gpu"]
    assert gpu["weights"] == "bf16" and gpu["experts_per_rank"] == [32, 32]
    assert gpu["expert_bytes"] * 16 == gpu["expert_bytes_total"] == 2 * routed
    assert gpu["replicated_bytes"] == 2 * (params["text_total"] - routed)

    cache = p["cache"]
    # 15 attention layers x K and V x 2 KV heads x 256 x bf16
    assert cache["kv_bytes_per_token"] == 15 * 2 * 2 * 256 * 2 == 30_720
    # 45 GDN layers x (conv: (2 x 16 x 128 + 64 x 128) channels x 3 x bf16
    #                  + recurrent: 64 heads x 128 x 128 x fp32)
    assert cache["gdn_state_bytes_per_seq"] == 45 * (12288 * 3 * 2 + 64 * 128 * 128 * 4)
    config = ModelConfig.from_hf(CONFIG_397B)
    assert cache["gdn_state_bytes_per_seq"] == HybridCache.bytes_per_slot(config, torch.bfloat16)
    assert cache["kv_bytes_per_token"] * 16 == HybridCache.bytes_per_block(
        config, 16, torch.bfloat16
    )
    at_8k = next(f for f in cache["fit"] if f["context"] == 8192)
    per_seq = cache["gdn_state_bytes_per_seq"] + 8192 * 30_720
    assert at_8k["seqs_per_gpu"] == gpu["cache_bytes"] // per_seq
    assert at_8k["seqs_per_group"] == 16 * at_8k["seqs_per_gpu"]

    share = p["all_to_all"]["per_token"]
    assert share["pairs_off_gpu"] == pytest.approx(k * 15 / 16)
    assert share["pairs_off_node"] == pytest.approx(k * 8 / 16)
    # a rank holds 32 experts: the chance that none of a token's 10 is among them
    miss = math.prod((E - 32 - i) / (E - i) for i in range(k))
    assert share["ranks_off_gpu"] == pytest.approx(15 * (1 - miss))
    assert share["ranks_off_node"] == pytest.approx(8 * (1 - miss))

    step = next(s for s in p["all_to_all"]["steps"] if s["batch"] == 64 and s["mode"] == "pairs")
    vector = H * 2
    # dispatch + combine of 64 tokens x 10 pairs: 7/16 of them to the 7 other GPUs of the node,
    # 8/16 to the other node
    assert step["nvlink_bytes_per_layer"] == pytest.approx(2 * 64 * k * 7 / 16 * vector)
    assert step["ib_bytes_per_layer"] == pytest.approx(2 * 64 * k * 8 / 16 * vector)
    assert step["ib_bytes_per_step"] == pytest.approx(60 * 2 * 64 * k * 8 / 16 * vector)
    assert step["ib_s_per_step"] == pytest.approx(step["ib_bytes_per_step"] / 50e9)
    assert step["nvlink_s_per_step"] == pytest.approx(step["nvlink_bytes_per_step"] / 450e9)


@needs_397b
def test_fp8_weights_halve_the_expert_bytes_plus_block_scales():
    raw = json.loads(CONFIG_397B.read_text())
    bf16 = plan(raw, Hardware())["per_gpu"]
    fp8 = plan(raw, Hardware(weights="fp8"))["per_gpu"]
    # one fp32 scale per 128 x 128 block of each expert's gate_up [2048, 4096], down [4096, 1024]
    scales = 60 * 32 * 4 * (16 * 32 + 32 * 8)
    assert fp8["expert_bytes"] == bf16["expert_bytes"] // 2 + scales


def test_uneven_split_sizes_every_rank_by_the_largest_shard():
    raw = tiny_raw(dense=False)
    p = plan(raw, Hardware(nodes=1, gpus_per_node=3, ep=3))
    gpu, share = p["per_gpu"], p["all_to_all"]["per_token"]
    # 16 experts over 3 ranks: 6, 5, 5
    assert gpu["experts_per_rank"] == [5, 6]
    assert gpu["expert_bytes"] == gpu["expert_bytes_total"] * 6 // 16
    # uneven or not, on average (N - 1) / N of a token's pairs leave its GPU; one node: none
    # leaves the node
    assert share["pairs_off_gpu"] == pytest.approx(4 * 2 / 3)
    assert share["pairs_off_node"] == 0
    assert all(s["ib_bytes_per_step"] == 0 for s in p["all_to_all"]["steps"])


def test_dense_model_has_no_all_to_all():
    p = plan(tiny_raw(dense=True), Hardware(nodes=1, gpus_per_node=2, ep=2))
    assert p["per_gpu"]["expert_bytes"] == 0
    assert p["all_to_all"] == {"per_token": None, "steps": []}


def test_more_ranks_than_gpus_names_the_settings(tmp_path):
    with pytest.raises(ValueError, match="ep=17 .* nodes=2 x gpus_per_node=8"):
        Hardware(ep=17)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_raw(dense=False)))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--ep", "17"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "raise nodes or lower ep" in out.stderr


def test_script_prints_the_tables(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_raw(dense=False)))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(tmp_path), "--nodes", "1", "--ep", "4"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for heading in ("## Parameters", "## Bytes per GPU", "## Cache per sequence", "## All-to-all"):
        assert heading in out


@needs_397b
def test_docs_quote_the_scripts_output():
    """docs/parallelism.md pastes what its commands print; they must still print it."""
    doc = (ROOT / "docs" / "parallelism.md").read_text()
    config = "../" + CONFIG_397B.relative_to(ROOT.parent).as_posix()
    command = [sys.executable, str(SCRIPT), "--config", config, "--batches", "16", "64", "256"]

    def run(*extra: str) -> str:
        out = subprocess.run([*command, *extra], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip()

    assert run() in doc
    fp8 = run("--weights", "fp8")
    assert fp8[fp8.index("## Bytes per GPU") : fp8.index("## All-to-all")].strip() in doc
