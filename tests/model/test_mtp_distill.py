"""distill-mtp (model/mtp_distill.py): a short run on qwen35-tiny changes only the MTP head,
trains what the engine runs, lowers the held-out loss and gives the same bytes twice."""

import json

import pytest
import torch
from safetensors import safe_open

from qwen35_ray.cli import build_parser
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mtp_distill import (
    REPORT,
    DistillConfig,
    _trainable_mtp,
    distill_mtp,
    mtp_train_forward,
    prefill,
)
from qwen35_ray.model.source import resolve_model

SHORT = DistillConfig(
    steps=12, train_sequences=8, eval_sequences=4, prompt_len=8, new_tokens=24, batch_sequences=4
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs with the same seed, into two directories."""
    out = [tmp_path_factory.mktemp(f"distilled{i}") for i in range(2)]
    reports = [distill_mtp("qwen35-tiny", d, SHORT) for d in out]
    return out, reports


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        # int16 views: equal means equal bytes (bf16), NaN or not
        return {n: f.get_tensor(n).view(torch.int16) for n in f.keys()}


def test_only_mtp_tensors_change(runs):
    (out, _), _ = runs
    source = resolve_model("qwen35-tiny")
    before, after = _tensors(source), _tensors(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    mtp = {n for n in before if n.startswith("mtp.")}
    assert changed and changed <= mtp
    # the head's norms, fc and layer all trained
    assert {"mtp.fc.weight", "mtp.norm.weight"} <= changed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in mtp)
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            assert (out / f.name).read_bytes() == f.read_bytes()


def test_same_seed_same_head(runs):
    (a, b), _ = runs
    ta, tb = _tensors(a), _tensors(b)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)


def test_report_and_held_out_loss(runs):
    (out, _), (report, _) = runs
    saved = json.loads((out / REPORT).read_text())
    assert saved["seed"] == 0 and saved["steps"] == SHORT.steps
    assert saved["eval_positions"] == SHORT.eval_sequences * SHORT.new_tokens
    acc = saved["acceptance"]
    assert set(acc) == {"before", "after_fp32", "after_saved"}
    assert all(0 <= v <= 1 for v in acc.values())
    kl = saved["held_out_kl"]
    assert kl["after_fp32"] < kl["before"]
    assert report["acceptance"] == acc


def test_training_forward_is_the_engine_forward():
    engine, _, _ = load_model("qwen35-tiny", dtype="float32", with_mtp=True, progress=False)
    trained, _, _ = load_model("qwen35-tiny", dtype="float32", with_mtp=True, progress=False)
    _trainable_mtp(trained)  # unfused, own tensors: as in training
    gen = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, 1100, (3, 41), generator=gen)
    next_ids = torch.cat([seqs[:, 1:], seqs[:, :1]], dim=1)
    with torch.no_grad():
        hidden, batch, cache = prefill(engine, seqs, with_mtp=True)
        want = engine.mtp_forward(next_ids.reshape(-1), hidden.reshape(123, -1), batch, cache)
        got = mtp_train_forward(trained, hidden, next_ids)
    torch.testing.assert_close(got.reshape(123, -1), want, atol=1e-4, rtol=1e-4)
    # and it is differentiable in the head's parameters
    got = mtp_train_forward(trained, hidden, next_ids)
    got.square().sum().backward()
    assert trained.mtp.layers[0].self_attn.q_proj.weight.grad is not None


def test_cli_parses_distill_mtp():
    args = build_parser().parse_args(["distill-mtp", "out", "--steps", "5", "--seed", "3"])
    assert (args.out_dir, args.model, args.steps, args.seed, args.threads) == (
        "out",
        "qwen35-tiny",
        5,
        3,
        2,
    )


def test_a_chain_main_model_gives_the_head_something_to_learn(tmp_path):
    # the main model made to follow a random token chain (model/mtp_chain.py): at mix 0 it
    # always does; a short distillation then lifts acceptance far above chance, which the
    # random main model never allows (docs/mtp.md)
    from qwen35_ray.model.mtp_chain import chain_checkpoint, follows
    from qwen35_ray.model.mtp_distill import greedy_continuations, ordinary_token_ids

    src = resolve_model("qwen35-tiny")
    vocab = ordinary_token_ids(src)
    f_of = chain_checkpoint(src, tmp_path / "chain0", vocab, 0.0, seed=3)
    net, _, _ = load_model(tmp_path / "chain0", dtype="float32", progress=False)
    prompts = vocab[torch.randint(len(vocab), (4, 8), generator=torch.Generator().manual_seed(1))]
    seqs = greedy_continuations(net, prompts, 12)
    assert follows(seqs, 8, f_of) == 1.0
    # the vision tower and the head are not touched; the layers' output projections are
    before, after = _tensors(src), _tensors(tmp_path / "chain0")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "lm_head.weight" in changed and not any(
        n.startswith(("mtp.", "model.visual.")) for n in changed
    )
    assert any(n.endswith("experts.down_proj") for n in changed)
    with pytest.raises(ValueError, match="within 0..1"):
        chain_checkpoint(src, tmp_path / "bad", vocab, 1.5, seed=3)

    cfg = DistillConfig(
        steps=40, train_sequences=32, eval_sequences=8, prompt_len=8, new_tokens=24,
        batch_sequences=8, chain_mix=0.1,
    )  # fmt: skip
    report = distill_mtp("qwen35-tiny", tmp_path / "out", cfg)
    assert report["main_model"]["follows_chain"] > 0.5
    assert report["acceptance"]["before"] < 0.05 < 0.3 < report["acceptance"]["after_saved"]
    assert not (tmp_path / "out" / "_chain_source").exists()
