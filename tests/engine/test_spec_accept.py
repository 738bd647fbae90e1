"""engine/spec_accept.py: greedy acceptance gives what one-token decoding gives, and the
sampled rule emits tokens distributed exactly as the main model's (chi-square over many
draws, with a wrong rule as the control that the test can tell apart)."""

import torch

from qwen35_ray.engine.spec_accept import (
    accept_greedy,
    accept_sampled,
    inverse_cdf,
    spec_uniforms,
)

# chi-square critical values at significance 0.001 (tables): 4 and 24 degrees of freedom
CHI2_4, CHI2_24 = 18.467, 51.179
V, DRAWS = 5, 20_000


def test_greedy_keeps_drafts_until_the_first_mismatch():
    drafts = torch.tensor([[3, 4, 5], [3, 9, 5], [7, 4, 5]])
    target = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6]])
    assert accept_greedy(drafts, target) == [[3, 4, 5, 6], [3, 4], [3]]


def test_uniforms_are_a_function_of_seed_and_position():
    a = spec_uniforms(7, 10, 3)
    assert a == spec_uniforms(7, 10, 3)
    assert a != spec_uniforms(8, 10, 3)
    # the accept test at a position and the draw at it are different numbers
    assert a[0][0] != a[1][0]
    # a later round starting at position 11 sees the same numbers for the same positions
    assert spec_uniforms(7, 11, 2)[0][:2] == a[0][1:]
    assert all(0 <= u < 1 for us in a for u in us)


def test_inverse_cdf_skips_tokens_without_weight():
    w = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    assert [inverse_cdf(w, u) for u in (0.0, 0.49, 0.5, 0.999999)] == [1, 1, 3, 3]


def dist(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(V, generator=g), 0)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def joint_counts(rule, p0, p1, q0, q1) -> torch.Tensor:
    """Counts of the first two emitted tokens over DRAWS rounds of k=2: the drafts drawn from
    q, verified against p0 and p1(. | x1) (p1 depends on the first token, as a model's does);
    a round that emits one token takes its second from the next round's p1."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    for _ in range(DRAWS):
        d1 = int(torch.multinomial(q0, 1, generator=g))
        d2 = int(torch.multinomial(q1, 1, generator=g))
        p = torch.stack([p0, p1[d1], p1[d1]])  # the third row is never read here
        u = torch.rand(5, generator=g).tolist()
        emitted = rule(torch.tensor([[d1, d2]]), torch.stack([q0, q1])[None], p[None], [u[:2]],
                       [u[2:]])[0]  # fmt: skip
        x1 = emitted[0]
        x2 = emitted[1] if len(emitted) > 1 else int(torch.multinomial(p1[x1], 1, generator=g))
        counts[x1, x2] += 1
    return counts


def wrong_rule(drafts, q, p, accept_u, draw_u):
    """A plausible mistake: after a rejection, draw from p instead of the residual."""
    out = accept_sampled(drafts, q, p, accept_u, draw_u)
    fixed = []
    for b, emitted in enumerate(out):
        n = len(emitted) - 1
        if n < drafts.shape[1]:
            emitted = emitted[:n] + [inverse_cdf(p[b, n], draw_u[b][n])]
        fixed.append(emitted)
    return fixed


def test_sampled_tokens_are_distributed_as_the_main_models():
    p0, q0, q1 = dist(1), dist(2), dist(3)
    p1 = torch.stack([dist(10 + x) for x in range(V)])  # p1[x1] is p(. | x1)
    want = (p0[:, None] * p1).flatten()
    counts = joint_counts(accept_sampled, p0, p1, q0, q1)
    assert chi2(counts.sum(1), p0) < CHI2_4
    assert chi2(counts.flatten(), want) < CHI2_24
    # the control: drawing from p after a rejection over-weights what q favours
    wrong = joint_counts(wrong_rule, p0, p1, q0, q1)
    assert chi2(wrong.sum(1), p0) > 5 * CHI2_4


def test_a_draft_equal_to_the_target_is_always_kept():
    p = torch.stack([dist(1), dist(2), dist(3)])[None]
    drafts = torch.tensor([[int(p[0, 0].argmax()), int(p[0, 1].argmax())]])
    emitted = accept_sampled(drafts, p[:, :2], p, [[0.999, 0.999]], [[0.5, 0.5, 0.5]])[0]
    assert emitted[:2] == drafts[0].tolist() and len(emitted) == 3
