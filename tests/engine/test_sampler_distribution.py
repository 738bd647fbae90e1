"""The batched sampler draws from today's distribution (engine/sampler_reference.py): the same
kept tokens with the same probabilities, whichever path (top-K candidates or the exact sort) a
row takes; greedy rows and logprobs as today; a draw independent of the batch around it."""

import math

import pytest
import torch

from qwen35_ray.engine import sampler
from qwen35_ray.engine import sampler_reference as reference
from qwen35_ray.engine.executor import SampleRow
from qwen35_ray.engine.sampler import sample
from qwen35_ray.engine.sampling_params import SamplingParams

V = 40
COMBOS = {
    "model default": dict(temperature=0.6, top_p=0.95, top_k=20),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "top_p narrow": dict(temperature=1.0, top_p=0.3),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "all three": dict(temperature=0.8, top_k=12, min_p=0.02, top_p=0.9),
    "plain": dict(temperature=1.3),
    "penalised": dict(
        temperature=0.9,
        top_p=0.9,
        repetition_penalty=1.4,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logit_bias={5: 2.0, 6: -100},
    ),
}


def row(params: dict, seed=0, position=0) -> SampleRow:
    return SampleRow("r", SamplingParams(**params), seed, position, [1, 2, 3, 9], [4, 4, 9, 30])


def todays_probs(logits: torch.Tensor, seq: SampleRow) -> torch.Tensor:
    """[V]: the distribution today's sampler draws from for one row."""
    x, p = logits.clone(), seq.params
    if p.logit_bias:
        reference._add_bias(x, p.logit_bias)
    x = reference.apply_penalties(x, seq).nan_to_num(nan=-torch.inf, neginf=-torch.inf)
    return reference.filter_logits(x / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)


def stratified_counts(logits: torch.Tensor, params: dict, n: int, monkeypatch) -> torch.Tensor:
    """Token counts [V] of n draws whose uniforms are (i + 0.5) / n, i = the position: each
    token is drawn n * p times, give or take one."""
    monkeypatch.setattr(sampler, "uniform", lambda seed, position: (position + 0.5) / n)
    rows = [row(params, 0, i) for i in range(n)]
    tokens, _ = sample(logits.expand(n, -1).contiguous(), rows)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).double()


@pytest.mark.parametrize("candidates,margin,widen", [(1024, 16, 16), (12, 0, 16), (3, 1, 2)])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_draws_follow_todays_distribution(combo, candidates, margin, widen, monkeypatch):
    """Small CANDIDATES / TIE_MARGIN / WIDEN send rows to wider candidates and the exact path
    (a nucleus wider than the candidates, ties past them): every path must keep today's
    tokens at today's odds."""
    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    monkeypatch.setattr(sampler, "TIE_MARGIN", margin)
    monkeypatch.setattr(sampler, "WIDEN", widen)
    n = 3000
    for trial in range(3):
        logits = torch.randn(V, generator=torch.Generator().manual_seed(trial)) * (1 + trial)
        expected = todays_probs(logits, row(COMBOS[combo])).double() * n
        got = stratified_counts(logits, COMBOS[combo], n, monkeypatch)
        assert (got - expected).abs().max() <= 1.01, (trial, got - expected)


@pytest.mark.parametrize("combo", ["model default", "min_p", "all three"])
def test_tied_logits_keep_every_token_tied_with_the_kth(combo, monkeypatch):
    """bf16 logits tie often; top-k keeps every token tied with the k-th, as today."""
    monkeypatch.setattr(sampler, "TIE_MARGIN", 0)
    n = 3000
    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        logits = (torch.randn(V, generator=gen) * 3).round()  # many ties
        params = dict(COMBOS[combo], top_p=1.0)
        expected = todays_probs(logits, row(params)).double() * n
        got = stratified_counts(logits, params, n, monkeypatch)
        assert (got - expected).abs().max() <= 1.01, (trial, got - expected)


def chi_square_bound(df: int, z: float = 3.72) -> float:
    """The chi-square statistic exceeded with probability about 1e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("combo", ["model default", "top_p", "min_p", "plain", "penalised"])
def test_seeded_draws_pass_a_chi_square_test_against_todays_distribution(combo):
    """The seeds' own uniforms (no stratification): 20,000 seeded draws, one per seed."""
    n = 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(7)) * 1.5
    probs = todays_probs(logits, row(COMBOS[combo])).double()
    rows = [row(COMBOS[combo], seed, 3) for seed in range(n)]
    tokens, _ = sample(logits.expand(n, -1).contiguous(), rows)
    got = torch.bincount(torch.tensor(tokens), minlength=V).double()
    kept = probs > 0
    assert got[~kept].sum() == 0
    expected = probs[kept] * n
    chi2 = float(((got[kept] - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_bound(int(kept.sum()) - 1), chi2


def test_candidates_and_the_exact_path_draw_the_same_token(monkeypatch):
    """A row's token depends on its logits and (seed, position) only, never on which path
    took it: tied logits, every combination, the candidate count as small as 2."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, V, generator=gen) * 2).round()
    combos = [dict(COMBOS[c]) for c in COMBOS]
    rows = [row(combos[i % len(combos)], seed=i, position=i) for i in range(64)]
    wide, _ = sample(logits, rows)
    monkeypatch.setattr(sampler, "CANDIDATES", 2)
    monkeypatch.setattr(sampler, "TIE_MARGIN", 0)
    assert sample(logits, rows)[0] == wide
    monkeypatch.setattr(sampler, "WIDEN", 2)
    assert sample(logits, rows)[0] == wide


def test_a_draw_does_not_depend_on_the_batch_around_it():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(12, 2000, generator=gen) * 3
    combos = [dict(temperature=0), *COMBOS.values(), dict(temperature=0.7, top_k=3000)]
    rows = [row(combos[i % len(combos)], seed=i, position=2 * i) for i in range(12)]
    together, _ = sample(logits, rows)
    alone = [sample(logits[i : i + 1], [r])[0][0] for i, r in enumerate(rows)]
    assert together == alone
    order = torch.randperm(12, generator=gen).tolist()
    shuffled, _ = sample(logits[order], [rows[i] for i in order])
    assert shuffled == [together[i] for i in order]


@pytest.mark.parametrize("masked", [False, True])
def test_greedy_rows_pick_todays_token(masked):
    """Argmax after bias, penalties and the grammar mask, with nan and inf logits, in a batch
    that also samples (the batched path, not the plain-greedy shortcut)."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(16, 500, generator=gen) * 4
    logits[3, 7], logits[4, 9], logits[5] = float("inf"), float("nan"), float("nan")
    allowed = logits.masked_fill(torch.rand(16, 500, generator=gen) < 0.5, -torch.inf)
    allowed = allowed if masked else None
    penalties = [
        dict(repetition_penalty=1.7),
        dict(presence_penalty=1.5, frequency_penalty=-0.5),
        dict(logit_bias={int(logits[2].argmin()): 100.0}),
        dict(repetition_penalty=1e300),
        {},
    ]
    rows = [
        SampleRow("r", SamplingParams(temperature=0, **penalties[i % 5]), i, i,
                  torch.randint(0, 500, (30,), generator=gen).tolist(),
                  torch.randint(0, 500, (12,), generator=gen).tolist())
        for i in range(15)
    ] + [row(COMBOS["model default"])]  # fmt: skip
    got, _ = sample(logits, rows, allowed)
    today, _ = reference.sample(logits, rows, allowed)
    assert got[:15] == today[:15]


def test_logprobs_are_todays():
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 300, generator=gen) * 3
    rows = [row(dict(COMBOS["model default"], logprobs=k), seed=k) for k in (0, 1, 5)]
    rows += [row(dict(temperature=0, logprobs=k, presence_penalty=1.0)) for k in (0, 3, 20)]
    tokens, got = sample(logits, rows)
    for i, (token, lp) in enumerate(zip(tokens, got)):
        want = reference.token_logprobs(logits[i], token, rows[i].params.logprobs)
        assert list(lp) == list(want)
        assert list(lp.values()) == pytest.approx(list(want.values()), abs=1e-5)
    assert sampler.token_logprobs(logits[0], 7, 2) == pytest.approx(
        reference.token_logprobs(logits[0], 7, 2), abs=1e-5
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_draws_what_the_cpu_draws():
    """At the real vocabulary: the same tokens from logits on the GPU as on the CPU, so a
    request resumed on either draws the same token at the same position."""
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(96, 248320, generator=gen) * 4
    combos = [dict(temperature=0), *COMBOS.values()]
    rows = [row(combos[i % len(combos)], seed=i, position=i) for i in range(96)]
    cpu, cpu_lp = sample(logits, rows)
    gpu, gpu_lp = sample(logits.cuda(), rows)
    assert gpu == cpu
