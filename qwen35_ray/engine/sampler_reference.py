"""Today's sampler until issue 20, kept as the reference the batched sampler (sampler.py) is
tested and benchmarked against: penalties, temperature, top-k / top-p / min-p (top-p by sorting
the whole vocabulary) and a torch.multinomial draw, one row at a time on the host.

Its draw for output token number t comes from a generator seeded with token_seed(seed, t), so
it depends on (seed, t) only, as the batched sampler's does (with another draw method: the two
give the same distribution, not the same tokens).

Legend: B = sequences sampling in this step, V = vocabulary.
"""

import logging

import torch

from qwen35_ray.engine.executor import SampleRow
from qwen35_ray.engine.sampler import token_seed

log = logging.getLogger(__name__)


def apply_penalties(logits: torch.Tensor, seq: SampleRow) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt_token_ids + seq.output_token_ids)))
        picked = logits[seen]
        logits[seen] = torch.where(
            picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=logits.shape[-1])
        logits -= p.frequency_penalty * counts[: logits.shape[-1]].to(logits.dtype)
        logits -= p.presence_penalty * (counts[: logits.shape[-1]] > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k, outside the top-p nucleus, or below min_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, seqs: list[SampleRow], allowed: torch.Tensor | None = None
) -> tuple[list[int | None], list[dict | None]]:
    """logits [B, V] fp32 -> one token per sequence, and its logprobs when asked for.
    allowed: the same logits with the tokens each sequence's grammar forbids at -inf; logprobs
    still come from the model's own distribution. A row that fails gets the token None (the
    traceback is logged with its request id) and the other rows are sampled as usual."""
    picked = logits if allowed is None else allowed
    if all(_plain_greedy(seq.params) for seq in seqs):
        # one argmax for the whole batch instead of a few ops per row
        return picked.argmax(-1).tolist(), [None] * len(seqs)
    tokens, logprobs = [], []
    for raw, row, seq in zip(logits, picked, seqs):
        try:
            token = _sample_row(row.clone(), seq)
            top = seq.params.logprobs
            lp = None if top is None else token_logprobs(raw, token, top)
        except Exception:
            log.exception("sampling failed for request %r", seq.request_id)
            token, lp = None, None
        tokens.append(token)
        logprobs.append(lp)
    return tokens, logprobs


def _sample_row(row: torch.Tensor, seq: SampleRow) -> int:
    """row [V], a copy this function may change."""
    p = seq.params
    if p.logit_bias:
        _add_bias(row, p.logit_bias)
    # an extreme penalty overflows fp32: inf stays a (huge) finite logit, nan is never picked
    row = apply_penalties(row, seq).nan_to_num(
        nan=-torch.inf, posinf=torch.finfo(row.dtype).max, neginf=-torch.inf
    )
    if p.greedy:
        return int(row.argmax())
    probs = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
    total = probs.sum()
    if not (probs.isfinite().all() and total > 0):
        # vLLM's fallback for a distribution that overflowed or was filtered away entirely
        return int(row.argmax())
    generator = torch.Generator().manual_seed(token_seed(seq.seed, seq.position))
    return int(torch.multinomial(probs, 1, generator=generator))


def _add_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    ids = torch.tensor(list(bias), dtype=torch.long)
    row[ids] += torch.tensor(list(bias.values()), dtype=row.dtype)


def _plain_greedy(p) -> bool:
    """Greedy, no bias, no penalty and no logprobs: the token is the row's argmax."""
    return (
        p.greedy
        and not p.logit_bias
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
    )


def token_logprobs(raw: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """The chosen token's logprob and the `top` most likely, from the model's distribution."""
    lp = raw.log_softmax(-1)
    out = {token: float(lp[token])}
    if top:
        values, ids = lp.topk(top)
        out.update(zip(ids.tolist(), values.tolist()))
    return out
