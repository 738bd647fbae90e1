"""Speculative decoding's acceptance rule (issue 22): which of a sequence's k draft tokens the
main model keeps, and the token that follows them. Pure functions over the verify step's
outputs (model/verify.py), so that every sequence of a step can take its own k.

Greedy: a draft is kept while it equals the main model's argmax at its position; the token
after the kept drafts is the argmax at the first mismatch (or after the last draft). That is
token for token what decoding one token at a time gives.

Sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023). Draft d_i, drawn from
the draft model's distribution q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)) while
every draft before it was kept, p_i being the main model's distribution at that position. At
the first rejection the token is drawn from the residual norm(max(p_i - q_i, 0)); with every
draft kept, from p_k. The emitted tokens are then distributed exactly as the main model's own
samples, whatever q is; q only decides how many are kept.

The randomness is stateless, as the sampler's (engine/sampler.py): each uniform comes from the
sequence's seed and the output position it decides, in streams of their own, so a request
resumed elsewhere draws the same.

Legend: B = sequences, k = drafts per sequence, V = vocabulary.
"""

import torch

from qwen35_ray.engine.sampler import MASK64, nucleus, penalised, uniform

# stream tags mixed into the seed: the accept tests and the draws after them
ACCEPT_STREAM = 0x5A17_ACCE_0000_0001
DRAW_STREAM = 0x5A17_D4A3_0000_0002
# the head's draws of a sampled request's drafts
DRAFT_STREAM = 0x5A17_D2AF_0000_0003


def spec_uniform(seed: int, position: int, stream: int) -> float:
    """A uniform number in [0, 1) for output position `position`, in `stream`."""
    return uniform((seed ^ stream) & MASK64, position)


def spec_uniforms(seed: int, start: int, k: int) -> tuple[list[float], list[float]]:
    """(accept uniforms for positions start .. start+k-1, draw uniforms for start .. start+k):
    one of the draw uniforms is used, at the position of the token drawn."""
    accept = [spec_uniform(seed, start + i, ACCEPT_STREAM) for i in range(k)]
    draw = [spec_uniform(seed, start + i, DRAW_STREAM) for i in range(k + 1)]
    return accept, draw


def accept_greedy(drafts: torch.Tensor, target: torch.Tensor) -> list[list[int]]:
    """drafts [B, k], target [B, k+1] (the main model's argmax at each verified position) ->
    each sequence's emitted tokens: its kept drafts, then the main model's token after them
    (1 .. k+1 tokens)."""
    k = drafts.shape[1]
    kept = torch.cumprod((drafts == target[:, :k]).to(torch.int64), dim=1).sum(1).tolist()
    rows = target.tolist()
    return [row[: n + 1] for row, n in zip(rows, kept)]


def accept_sampled(
    drafts: torch.Tensor,  # [B, k] long
    q: torch.Tensor,  # [B, k, V] the draft distributions the drafts were drawn from
    p: torch.Tensor,  # [B, k+1, V] the main model's distributions at the verified positions
    accept_u: list[list[float]],  # [B][k] uniforms of the accept tests
    draw_u: list[list[float]],  # [B][k+1] uniforms of the draw at each position
) -> list[list[int]]:
    """Each sequence's emitted tokens (its kept drafts, then one drawn token), distributed
    exactly as the main model's samples (module docstring)."""
    k = drafts.shape[1]
    p, q = p.float(), q.float()
    out = []
    for b in range(drafts.shape[0]):
        emitted = []
        for i in range(k):
            d = int(drafts[b, i])
            pd, qd = float(p[b, i, d]), float(q[b, i, d])
            if qd > 0 and accept_u[b][i] * qd < pd:
                emitted.append(d)
                continue
            residual = (p[b, i] - q[b, i]).clamp_min(0)
            if float(residual.sum()) <= 0:  # p == q up to rounding: nothing to correct
                residual = p[b, i]
            emitted.append(inverse_cdf(residual, draw_u[b][i]))
            break
        else:
            emitted.append(inverse_cdf(p[b, k], draw_u[b][k]))
        out.append(emitted)
    return out


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The token whose interval of the cumulative weights (token-id order, unnormalised)
    holds u times their sum."""
    cdf = torch.cumsum(weights.double(), 0)
    i = int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True))
    # u * total can round up to the total: the last token with weight
    return min(i, int(torch.nonzero(weights).max()))


def draft_mode(params) -> str | None:
    """How a request's verify rows keep drafts: "greedy" (equal to the argmax), "sampled"
    (rejection sampling), or None: they keep none, since something else reads or changes the
    step's logits (logit_bias, penalties, logprobs, a grammar, a thinking budget)."""
    p = params
    if p.structured is not None or p.thinking_token_budget is not None:
        return None
    if p.logit_bias or p.logprobs is not None or penalised(p):
        return None
    return "greedy" if p.greedy else "sampled"


def sampling_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """logits [n, V] -> [n, V] fp32: the distribution the sampler draws a token of one request
    from (temperature, then the top-k, min-p and top-p it keeps; engine/sampler.py), each row
    sorted whole. For the rows speculative sampling verifies: no bias, penalty or grammar."""
    s = logits.float() / params.temperature
    V = s.shape[-1]
    if not 0 < params.top_k < V and params.top_p >= 1 and params.min_p <= 0:
        # nothing truncated: no sort of the vocabulary, which costs a large model's step dear
        return s.softmax(-1)
    ranked, order = s.sort(dim=-1, descending=True, stable=True)
    kept, _ = nucleus(ranked, [params] * s.shape[0], s.shape[-1], None)
    keep = torch.zeros_like(kept).scatter(-1, order, kept)
    return s.masked_fill(~keep, -torch.inf).softmax(-1)
