"""Sampler and SamplingParams: extreme values never crash a batch, logit_bias, seed range."""

import pytest
import torch

from qwen35_ray.engine.executor import SampleRow
from qwen35_ray.engine.sampler import sample, token_seed
from qwen35_ray.engine.sampling_params import SamplingParams

V = 11


def seq(seed=0, position=1, **params) -> SampleRow:
    return SampleRow("r", SamplingParams(**params), seed, position, [1, 2, 3], [4])


def logits(rows=1, seed=42) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("logprobs", [None, 0])
def test_a_temperature_below_vllm_epsilon_is_greedy(logprobs):
    x = logits()
    tokens, _ = sample(x, [seq(temperature=1e-300, logprobs=logprobs)])
    assert tokens == [int(x[0].argmax())]
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-5).greedy


def test_an_overflowing_distribution_falls_back_to_the_argmax():
    x = logits()
    x[0, 7] = float("inf")
    x[0, 2] = float("nan")
    for s in range(5):
        tokens, _ = sample(x, [seq(s, temperature=0.5)])
        assert tokens == [7]
    tokens, _ = sample(torch.full((1, V), float("nan")), [seq(temperature=0.5)])
    assert tokens[0] is not None and 0 <= tokens[0] < V


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_extreme_repetition_penalties_still_pick_a_token(penalty, temperature):
    x = logits()
    x[0, [1, 2, 3, 4]] = torch.tensor([2.0, -2.0, 0.0, 9.0])  # seen tokens of every sign
    for s in range(5):
        p = dict(temperature=temperature, repetition_penalty=penalty)
        tokens, _ = sample(x.clone(), [seq(s, **p)])
        assert tokens[0] is not None and 0 <= tokens[0] < V


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_forces_and_bans_tokens(temperature):
    x = logits()
    top, runner_up = x[0].topk(2).indices.tolist()
    low = int(x[0].argmin())
    assert sample(x, [seq(temperature=temperature, logit_bias={low: 100})])[0] == [low]
    if temperature == 0:
        banned = sample(x, [seq(temperature=0, logit_bias={top: -100})])[0]
        assert banned == [runner_up]


def test_logit_bias_in_a_greedy_batch_applies_to_its_own_row_only():
    x = logits(2)
    low = int(x[0].argmin())
    tokens, _ = sample(x, [seq(temperature=0, logit_bias={low: 100}), seq(temperature=0)])
    assert tokens == [low, int(x[1].argmax())]


def test_a_failing_row_fails_alone():
    x = logits(3)
    alone, _ = sample(x[2:], [seq(7, temperature=0.9)])
    # asking for more top logprobs than the vocabulary has makes topk raise in that row only
    rows = [
        seq(temperature=0, logprobs=0),
        seq(temperature=0, logprobs=V + 5),
        seq(7, temperature=0.9),
    ]
    tokens, logprobs = sample(x, rows)
    assert tokens == [int(x[0].argmax()), None, alone[0]]
    assert logprobs[0] is not None and logprobs[1] is None


def test_seed_range_is_int64():
    SamplingParams(seed=2**63 - 1)
    SamplingParams(seed=-(2**63))
    for bad in (2**63, 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"seed=.* must be in \[-9223372036854775808, 9223"):
            SamplingParams(seed=bad)


def test_logit_bias_keys_become_ints_and_values_are_bounded():
    # a RequestState's JSON turns the keys into strings
    assert SamplingParams(logit_bias={"42": -100, 7: 0.5}).logit_bias == {42: -100.0, 7: 0.5}
    with pytest.raises(ValueError, match=r"logit_bias\[3\]=100.5 must be in \[-100, 100\]"):
        SamplingParams(logit_bias={3: 100.5})
    with pytest.raises(ValueError, match="logit_bias key 'abc' must be a token id"):
        SamplingParams(logit_bias={"abc": 1})
    with pytest.raises(ValueError, match="logit_bias key -1 must be a token id"):
        SamplingParams(logit_bias={-1: 1})
    with pytest.raises(ValueError, match=r"logit_bias\[3\]=nan must be in"):
        SamplingParams(logit_bias={3: float("nan")})


def test_a_draw_depends_on_seed_and_position_only():
    """Stateless randomness: the same (seed, position) draws the same token in any batch and
    any order, so a request resumed elsewhere draws what it would have drawn here."""
    x = logits(4).repeat(2, 1)
    params = dict(temperature=1.5)
    rows = [seq(s, pos, **params) for s in (0, 1) for pos in (0, 1, 2, 3)]
    forward, _ = sample(x, rows)
    backward, _ = sample(x.flip(0), rows[::-1])
    assert forward == backward[::-1]
    alone = [sample(x[i : i + 1], [r])[0][0] for i, r in enumerate(rows)]
    assert alone == forward
    # across many draws, seeds and positions are not tied to one another
    flat = torch.zeros(1, V)
    draws = {(s, p): sample(flat, [seq(s, p, **params)])[0][0] for s in range(8) for p in range(8)}
    assert len(set(draws.values())) == V
    assert len({token_seed(s, p) for s in range(64) for p in range(64)}) == 64 * 64
    assert 0 <= token_seed(2**64 - 1, 2**40) < 2**64 and token_seed(-1, 0) == token_seed(
        2**64 - 1, 0
    )
