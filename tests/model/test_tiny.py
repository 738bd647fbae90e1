"""The embedded tiny checkpoints: deterministic, complete, and loadable by transformers too."""

import pytest
import torch
import transformers
from model_driver import Driver
from safetensors import safe_open

from qwen35_ray.cli import main
from qwen35_ray.model.loader import load_model

VARIANTS = {"qwen35-tiny": [], "qwen35-tiny-dense": ["--dense"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    assert main(["make-tiny", str(out), *VARIANTS[request.param]]) == 0
    return request.param, out


def test_make_tiny_twice_is_byte_identical(tiny, tmp_path):
    name, first = tiny
    main(["make-tiny", str(tmp_path), *VARIANTS[name]])
    files = sorted(p.name for p in first.iterdir())
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(files)
    assert files == sorted(p.name for p in tmp_path.iterdir())
    for f in files:
        assert (first / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_every_layer_kind_is_present_within_30m_parameters(tiny):
    name, path = tiny
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        total = sum(_numel(f.get_slice(n).get_shape()) for n in names)
    assert total <= 30_000_000
    joined = "\n".join(names)
    assert ".linear_attn.in_proj_qkv.weight" in joined  # Gated DeltaNet
    assert ".self_attn.q_norm.weight" in joined  # gated attention
    assert "mtp.fc.weight" in joined and "mtp.layers.0.self_attn.q_proj.weight" in joined
    if name == "qwen35-tiny":
        assert ".mlp.experts.gate_up_proj" in joined and ".mlp.shared_expert_gate.weight" in joined
    else:
        assert ".mlp.gate_proj.weight" in joined and "experts" not in joined


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@torch.no_grad()
def test_transformers_loads_it_and_agrees_with_us(tiny):
    _, path = tiny
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    ours, config, _ = load_model(path, dtype="float32", progress=False)
    logits, _, _ = Driver(ours, config).step({0: ids})
    expected = ref(torch.tensor([ids])).logits[0].double()
    ref = ref.double()
    if hasattr(ref, "set_experts_implementation"):
        ref.set_experts_implementation("eager")  # the grouped-mm experts take no fp64
    exact = ref(torch.tensor([ids])).logits[0]
    # this checks the format end to end; the tight numerical bar is test_equivalence's. Eight
    # layers of random weights amplify fp32 rounding to about 1e-3 here, in the reference's
    # own fp32 run against its fp64 run: ours must be within twice that of the fp64 run.
    ours_err = (logits[0].double() - exact).abs().max().item()
    ref_err = (expected - exact).abs().max().item()
    assert ours_err <= 2 * ref_err, (ours_err, ref_err)


def test_embedded_name_is_generated_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN35_RAY_CACHE", str(tmp_path))
    _, config, path = load_model("qwen35-tiny", progress=False)
    assert path.parent == tmp_path and config.family == "qwen3_5_moe"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    load_model("qwen35-tiny", progress=False)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
