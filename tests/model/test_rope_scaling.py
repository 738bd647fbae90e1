"""Long-context RoPE: a YaRN checkpoint (what Qwen documents past 262,144 tokens) runs as
transformers runs it on prompts of thousands of tokens, through prefill, chunked prefill and
decode; plain RoPE on the same weights would not; any other rope_type is refused by name.

The random checkpoints have original_max_position_embeddings 1024 and factor 4, so a prompt of
3500 tokens reaches 3.4x past the pretraining length, where YaRN's frequencies matter.
"""

import copy

import pytest
import torch
from hf_reference import hf_model, save
from model_driver import Driver
from qwen35_kernels.rope import rope_inv_freq

from qwen35_ray.model.attention import GatedAttention
from qwen35_ray.model.loader import load_model

KINDS = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]
# Both sides round in fp32; over 3500 tokens (GDN recurrence, attention over thousands of keys)
# each one's error against transformers' fp64 run reaches 4e-4, with plain RoPE alike, and the two
# fp32 runs differ by up to 4.4e-4 (measured, 3 kinds x 4 prompts). test_equivalence.py's 2e-4
# holds at 200 tokens.
TOL = 1e-3
ORIGINAL = 1024
N = 3500
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10_000_000.0,
    "partial_rotary_factor": 0.25,
    "factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
}
# Qwen3.5's multimodal RoPE sections (interleaved), sized to the 4 rotary frequencies here
MROPE = {"mrope_section": [2, 1, 1], "mrope_interleaved": True}


def rope_parameters(kind: str, **overrides) -> dict:
    return {**YARN, **(MROPE if kind != "qwen3_next" else {}), **overrides}


@pytest.fixture(scope="module", params=KINDS)
def yarn_pair(request, tmp_path_factory):
    kind = request.param
    ref = hf_model(kind, max_position_embeddings=ORIGINAL, rope_parameters=rope_parameters(kind))
    path = save(ref, tmp_path_factory.mktemp(f"{kind}-yarn"))
    ours, config, _ = load_model(path, dtype="float32", progress=False)
    return kind, ref, ours, config


def fp64(ref):
    ref = copy.deepcopy(ref).double()
    if hasattr(ref, "set_experts_implementation"):
        ref.set_experts_implementation("eager")  # the grouped-mm experts take no fp64
    return ref


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    return ref(torch.tensor([ids])).logits[0].float()


def driver(ours, config) -> Driver:
    return Driver(ours, config, num_slots=2, num_blocks=N // 16 + 16)


def test_config_reads_yarn(yarn_pair):
    kind, ref, _, config = yarn_pair
    s = config.rope_scaling
    assert (s.factor, s.original_max_position_embeddings) == (4.0, ORIGINAL)
    assert config.context_len == 4 * ORIGINAL
    rotary = ref.model.language_model if kind == "qwen3_5_moe" else ref.model
    assert s.attention_factor == rotary.rotary_emb.attention_scaling


def test_long_prompt_prefill_and_chunks_match_transformers(yarn_pair):
    """One prefill of the whole prompt, then the same prompt in chunks across the original
    context length, against transformers' logits at every position."""
    _, ref, ours, config = yarn_pair
    ids = prompt(N, seed=1)
    expected = ref_logits(ref, ids)
    whole = driver(ours, config).step({0: ids})[0][0]
    torch.testing.assert_close(whole, expected, atol=TOL, rtol=0)
    with torch.no_grad():
        exact = fp64(ref)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(whole.double(), exact, atol=TOL, rtol=0)
    d = driver(ours, config)
    cuts = [0, 700, 701, 1500, 2900, N]
    chunks = [d.step({1: ids[a:b]})[0][1] for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(torch.cat(chunks), expected, atol=TOL, rtol=0)


def test_decode_after_long_prompt_matches_transformers(yarn_pair):
    """Greedy decode steps (the CPU decode path over DecodeKV) at positions past 3x the
    original context, each against transformers' uncached forward over the same tokens."""
    _, ref, ours, config = yarn_pair
    ids = prompt(N - 8, seed=2)
    d = driver(ours, config)
    last = d.step({0: ids})[0][0][-1]
    for _ in range(4):
        ids = ids + [int(last.argmax())]
        last = d.step({0: ids[-1:]})[0][0][-1]
        torch.testing.assert_close(last, ref_logits(ref, ids)[-1], atol=TOL, rtol=0)


def test_ignoring_yarn_would_give_other_logits(yarn_pair, tmp_path):
    """The negative control: our model with plain RoPE (as if rope_type were ignored) matches
    transformers run with rope_type default, and is far from the YaRN checkpoint's logits past
    original_max_position_embeddings (and before it: YaRN changes every frequency it
    interpolates, and the attention factor scales every position but the first)."""
    kind, ref, ours, config = yarn_pair
    plain = copy.deepcopy(ours)
    for m in plain.modules():
        if isinstance(m, GatedAttention):
            m.inv_freq, m.rope_scale = rope_inv_freq(config.rotary_dim, config.rope_theta), 1.0
    ref_plain = hf_model(
        kind,
        max_position_embeddings=ORIGINAL,
        rope_parameters=rope_parameters(kind, rope_type="default"),
    )
    ref_plain.load_state_dict(ref.state_dict())
    ids = prompt(N, seed=3)
    got = driver(plain, config).step({0: ids})[0][0]
    torch.testing.assert_close(got, ref_logits(ref_plain, ids), atol=TOL, rtol=0)
    gap = (got - ref_logits(ref, ids)).abs().amax(dim=-1)  # [N]
    # measured: median 0.022 to 0.029 past position 1024, max 0.066 to 1.07 (3 kinds)
    assert gap[ORIGINAL:].median() > 10 * TOL, gap[ORIGINAL:].median()
    assert gap[ORIGINAL:].max() > 50 * TOL, gap[ORIGINAL:].max()
