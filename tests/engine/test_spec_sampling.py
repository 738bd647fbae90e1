"""Speculative sampling (issue 22): a sampled request keeps the head's drafts by rejection
sampling (engine/spec_accept.py), and its tokens must be distributed exactly as without
speculation. Many seeded draws of the first output tokens of one prompt, with and without
speculation, compared by a chi-square test of homogeneity per position; on a head distilled
from a chained main model, so drafts are kept and the rule is exercised."""

import pytest
import torch

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.mtp_distill import ordinary_token_ids

DRAWS = 500
TOKENS = 4  # output positions compared: the first is sampled, the rest verified


@pytest.fixture(scope="module")
def chain(chain_checkpoint):
    return chain_checkpoint("qwen35-tiny")


def draws(path, prompt: list[int], params: dict, speculative: dict | None):
    """DRAWS seeded outputs of TOKENS tokens each, all in one batch, and the engine's stats."""
    engine = LLMEngine.from_pretrained(
        str(path), dtype="float32", max_num_seqs=DRAWS, compile_decode=False,
        kv_cache_memory_bytes=64 * 2**20, speculative=speculative,
    )  # fmt: skip
    for i in range(DRAWS):
        p = SamplingParams(max_tokens=TOKENS, ignore_eos=True, seed=1000 + i, **params)
        engine.add_request(str(i), prompt, p)
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return [out[str(i)] for i in range(DRAWS)], engine.load_stats()


def homogeneity_p(a: list, b: list) -> float:
    """p-value of the chi-square test that samples a and b come from one distribution
    (categories seen fewer than 5 times in both together pooled into one)."""
    cats = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c), b.count(c)] for c in cats], dtype=torch.float64)
    rare = counts.sum(1) < 5
    counts = torch.cat([counts[~rare], counts[rare].sum(0, keepdim=True)])
    counts = counts[counts.sum(1) > 0]
    if len(counts) < 2:
        return 1.0
    expected = counts.sum(1, keepdim=True) * counts.sum(0) / counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), chi2 / 2))


@pytest.mark.parametrize(
    "params", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}]
)
def test_speculative_sampling_keeps_the_distribution(chain, params):
    prompt = ordinary_token_ids(chain)[:12].tolist()
    plain, _ = draws(chain, prompt, params, None)
    spec, stats = draws(chain, prompt, params, {"method": "mtp", "num_speculative_tokens": 2})
    # drafts were verified and kept: the rejection rule decided tokens
    assert stats["spec_decode_num_drafts_total"] > DRAWS
    assert stats["spec_decode_num_accepted_tokens_total"] > DRAWS // 4
    for t in range(TOKENS):
        p = homogeneity_p([o[t] for o in plain], [o[t] for o in spec])
        assert p > 1e-3, f"output position {t}: the token distributions differ (p={p:.2g})"
    # the joint of two verified positions too
    p = homogeneity_p([tuple(o[1:3]) for o in plain], [tuple(o[1:3]) for o in spec])
    assert p > 1e-3, f"positions 1-2 jointly differ (p={p:.2g})"


def test_homogeneity_test_can_fail():
    """The test above can fail: two different distributions give a tiny p."""
    g = torch.Generator().manual_seed(0)
    a = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), DRAWS, True, generator=g).tolist()
    b = torch.multinomial(torch.tensor([0.3, 0.3, 0.4]), DRAWS, True, generator=g).tolist()
    assert homogeneity_p(a, b) < 1e-6
    c = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), DRAWS, True, generator=g).tolist()
    assert homogeneity_p(a, c) > 1e-3
