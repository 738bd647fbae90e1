"""Sampler: logit_bias, penalties, temperature, top-k / top-p / min-p and a seeded draw, for the
whole batch at once, on the device the logits are on. Only the sampled token ids (and the
logprobs a row asks for) come back to the host.

The randomness is stateless: the draw for a sequence's output token number t is one uniform
number derived from token_seed(seed, t), turned into a token by inverting the cumulative
distribution of the row's kept tokens taken in token-id order. Nothing but (seed, t) and the
row's own logits decides it, so a request resumed on another engine from the tokens it already
has draws exactly what it would have drawn here, whatever else shares either batch.

Truncation never sorts the vocabulary: a row looks at its top `top_k + TIE_MARGIN` tokens (top_k
set) or its top CANDIDATES (only top_p / min_p), and keeps what today's filter keeps: top-k (ties
at the k-th value kept), then min_p against the most likely token, then the top_p nucleus of the
renormalised rest. A row whose kept set may reach past its candidates (ties at the boundary, a
nucleus wider than CANDIDATES) tries again with WIDEN times as many, then sorts the whole row;
every path keeps the same tokens and draws the same one for the same uniform.

Legend: B = sequences sampling in this step, V = vocabulary, K = candidate tokens of a row.
"""

import logging

import torch

from qwen35_ray.engine.executor import SampleRow

log = logging.getLogger(__name__)

MASK64 = 2**64 - 1
# tokens a row with top_p or min_p but no top_k draws from when they hold its nucleus
CANDIDATES = 1024
# candidates beyond top_k, so that ties at the k-th value rarely send a row to the exact path
TIE_MARGIN = 16
# how much wider the next try is when a row's candidates did not hold its kept set
WIDEN = 4


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al.): a bijection of 64-bit integers that scatters
    nearby inputs over the whole range."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def token_seed(seed: int, position: int) -> int:
    """The seed of the draw for output token number `position` of a sequence seeded with
    `seed`: a 64-bit mix of both, so neighbouring seeds and positions get unrelated draws
    (seed + i is output i of n)."""
    return _splitmix64(_splitmix64(seed & MASK64) ^ position)


def uniform(seed: int, position: int) -> float:
    """The draw's uniform number in [0, 1): the top 53 bits of one more splitmix64 step."""
    return (_splitmix64(token_seed(seed, position)) >> 11) * 2.0**-53


def sample(
    logits: torch.Tensor, seqs: list[SampleRow], allowed: torch.Tensor | None = None
) -> tuple[list[int | None], list[dict | None]]:
    """logits [B, V] fp32 -> one token per sequence, and its logprobs when asked for.
    allowed: the same logits with the tokens each sequence's grammar forbids at -inf; logprobs
    still come from the model's own distribution. A row that fails gets the token None (the
    traceback is logged with its request id) and the other rows are sampled as usual."""
    picked = logits if allowed is None else allowed
    if all(plain_greedy(seq.params) for seq in seqs):
        # one argmax for the whole batch instead of a few ops per row
        return picked.argmax(-1).tolist(), [None] * len(seqs)
    try:
        return _sample_batch(logits, picked, seqs)
    except Exception:
        if len(seqs) == 1:
            log.exception("sampling failed for request %r", seqs[0].request_id)
            return [None], [None]
    # a row failed the batch (an out-of-range logit_bias id, too many top logprobs): each row
    # again on its own, which draws what it would have drawn in the batch
    tokens, logprobs = [], []
    for i, seq in enumerate(seqs):
        t, lp = sample(logits[i : i + 1], [seq], picked[i : i + 1])
        tokens += t
        logprobs += lp
    return tokens, logprobs


def _sample_batch(logits, picked, seqs) -> tuple[list[int], list[dict | None]]:
    x = _adjusted(picked, seqs)  # [B, V]
    greedy = [i for i, seq in enumerate(seqs) if seq.params.greedy]
    if len(greedy) == len(seqs):
        tokens = x.argmax(-1)
    else:
        drawn = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        tokens = _rows(x, greedy).argmax(-1) if greedy else None
        tokens = _merge(len(seqs), greedy, tokens, drawn, _draw(_rows(x, drawn), seqs, drawn))
    tokens = tokens.tolist()
    return tokens, _logprobs(logits, tokens, [seq.params.logprobs for seq in seqs])


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when rows are all of them in order."""
    if rows == list(range(x.shape[0])):
        return x
    return x[torch.tensor(rows, device=x.device)]


def _merge(B, rows_a, a, rows_b, b) -> torch.Tensor:
    out = torch.empty(B, dtype=torch.long, device=b.device)
    if rows_a:
        out[torch.tensor(rows_a, device=b.device)] = a
    out[torch.tensor(rows_b, device=b.device)] = b
    return out


def _adjusted(picked: torch.Tensor, seqs: list[SampleRow]) -> torch.Tensor:
    """[B, V] fp32: logit_bias added, penalties applied, nan at -inf and +inf at the largest
    finite logit (an extreme penalty overflows fp32; nan is never picked)."""
    changes = any(s.params.logit_bias or penalised(s.params) for s in seqs)
    x = picked.to(torch.float32, copy=changes)
    fix = dict(nan=-torch.inf, posinf=torch.finfo(x.dtype).max, neginf=-torch.inf)
    if not changes:
        return x.nan_to_num(**fix)
    _add_bias(x, seqs)
    apply_penalties(x, seqs)
    return x.nan_to_num_(**fix)


def _add_bias(x: torch.Tensor, seqs: list[SampleRow]) -> None:
    rows, ids, values = [], [], []
    for i, seq in enumerate(seqs):
        for token, value in (seq.params.logit_bias or {}).items():
            rows.append(i)
            ids.append(token)
            values.append(value)
    if rows:
        at = (torch.tensor(rows, device=x.device), torch.tensor(ids, device=x.device))
        x[at] += torch.tensor(values, dtype=x.dtype, device=x.device)


def apply_penalties(x: torch.Tensor, seqs: list[SampleRow]) -> None:
    """Repetition (prompt and output tokens), then frequency and presence (output tokens), in
    place on the logits [B, V], touching only the tokens each row has seen."""
    V, dev = x.shape[-1], x.device
    rep = [(i, s) for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        keys = _keys(V, [(i, s.prompt_token_ids + s.output_token_ids) for i, s in rep], dev)
        keys = keys.unique()
        at = (keys // V, keys % V)
        penalty = _per_row([s.params.repetition_penalty for s in seqs], dev)[at[0]]
        seen = x[at]
        x[at] = torch.where(seen > 0, seen / penalty, seen * penalty)
    counted = [
        (i, s)
        for i, s in enumerate(seqs)
        if (s.params.presence_penalty or s.params.frequency_penalty) and s.output_token_ids
    ]
    if counted:
        keys = _keys(V, [(i, s.output_token_ids) for i, s in counted], dev)
        keys, counts = keys.unique(return_counts=True)
        at = (keys // V, keys % V)
        frequency = _per_row([s.params.frequency_penalty for s in seqs], dev)[at[0]]
        presence = _per_row([s.params.presence_penalty for s in seqs], dev)[at[0]]
        x[at] = x[at] - frequency * counts.to(x.dtype) - presence


def _keys(V: int, rows: list[tuple[int, list[int]]], device) -> torch.Tensor:
    """row * V + token for each (row, tokens) [N], tokens past the vocabulary left out (they
    would land in the next row)."""
    keys = []
    for i, tokens in rows:
        t = torch.tensor(tokens, dtype=torch.long)
        keys.append(t[t < V] + i * V)
    return torch.cat(keys).to(device)


def _per_row(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _draw(x: torch.Tensor, seqs: list[SampleRow], rows: list[int]) -> torch.Tensor:
    """x [b, V] of the non-greedy rows `rows` of seqs -> their drawn tokens [b]."""
    b, V = x.shape
    dev = x.device
    params = [seqs[i].params for i in rows]
    s = x / _per_row([p.temperature for p in params], dev)[:, None]
    u = [uniform(seqs[i].seed, seqs[i].position) for i in rows]
    u = torch.tensor(u, dtype=torch.float64, device=dev)
    tokens = torch.empty(b, dtype=torch.long, device=dev)
    top = torch.empty(b, dtype=s.dtype, device=dev)  # each row's largest scaled logit
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(params):
        groups.setdefault(_candidates(p, V), []).append(j)
    # logsumexp of each whole row without top_k: its top_p nucleus is a share of all of it
    lse = torch.zeros(b, dtype=s.dtype, device=dev)
    whole = [j for j, p in enumerate(params) if _candidates(p, V) and not 0 < p.top_k < V]
    if whole:
        lse[torch.tensor(whole, device=dev)] = _rows(s, whole).logsumexp(-1)
    pending, exact = list(groups.items()), []
    while pending:
        K, group = pending.pop()
        g = torch.tensor(group, device=dev)
        part = [params[j] for j in group]
        if K == 0:
            tokens[g], top[g] = _draw_plain(_rows(s, group), u[g])
            continue
        tokens[g], top[g], done = _draw_candidates(_rows(s, group), K, part, u[g], lse[g])
        missed = [j for j, ok in zip(group, done.tolist()) if not ok]
        # wider top-Ks before a sort of the whole row: on 2 CPU cores, of 64 rows of 248,320,
        # topk(1024) took 0.06 s, topk(4096) 0.14 s, topk(16384) 0.22 s and the sort 1.6 s
        if missed and K * WIDEN < V // 2:
            pending.append((K * WIDEN, missed))
        else:
            exact += missed
    if exact:
        e = torch.tensor(exact, device=dev)
        tokens[e] = _draw_exact(_rows(s, exact), [params[j] for j in exact], u[e])
    # vLLM's fallback for a distribution that overflowed or was filtered away entirely
    bad = top.isinf()
    return torch.where(bad, x.argmax(-1), tokens) if bool(bad.any()) else tokens


def _candidates(p, V: int) -> int:
    """How many of a row's most likely tokens hold what it keeps (0: no truncation)."""
    if 0 < p.top_k < V:
        return min(V, p.top_k + TIE_MARGIN)
    if p.top_p < 1 or p.min_p > 0:
        return min(V, CANDIDATES)
    return 0


def _draw_plain(s, u) -> tuple[torch.Tensor, torch.Tensor]:
    """s [n, V] -> tokens [n] from the whole softmax, and each row's largest logit [n]."""
    ids = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    return _invert(s, ids, None, u)


def _draw_candidates(s, K: int, params, u, lse):
    """s [g, V] -> tokens [g] drawn from each row's top K, the row's largest logit [g], and
    whether the top K held the row's whole kept set [g] (False: a wider K decides). lse [g]:
    the logsumexp of each whole row without top_k."""
    vals, ids = s.topk(K)  # [g, K]
    # value order with ties in token-id order, whatever order topk left them in
    ids, by_id = ids.sort(-1)
    vals = vals.gather(-1, by_id)
    ranked, order = vals.sort(dim=-1, descending=True, stable=True)
    kept, closed = nucleus(ranked, params, s.shape[-1], lse)
    keep = torch.zeros_like(kept).scatter(-1, order, kept)
    tokens, top = _invert(vals, ids, keep, u)
    return tokens, top, closed


def _draw_exact(s, params, u) -> torch.Tensor:
    """s [e, V] -> tokens [e], each row sorted whole: the rows whose candidates did not hold
    their kept set."""
    ranked, order = s.sort(dim=-1, descending=True, stable=True)
    kept, _ = nucleus(ranked, params, s.shape[-1], None)
    keep = torch.zeros_like(kept).scatter(-1, order, kept)
    ids = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    return _invert(s, ids, keep, u)[0]


def nucleus(vals, params, V: int, open_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """vals [n, K] each row's most likely scaled logits, descending (ties in token-id order)
    -> which of them the row keeps [n, K], and whether its kept set is known to lie inside
    them [n]. open_lse [n]: logsumexp of each whole row, for rows without top_k."""
    n, K = vals.shape
    dev = vals.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else 0 for p in params], device=dev)
    min_p = _per_row([p.min_p for p in params], dev)[:, None]
    top_p = _per_row([p.top_p for p in params], dev)[:, None]
    last = vals[:, -1:]
    has_k = (top_k > 0)[:, None]
    kth = vals.gather(-1, (top_k - 1).clamp(min=0)[:, None])
    kth = torch.where(has_k, kth, -torch.inf)
    # today's top-k keeps every token tied with the k-th
    keep = vals >= kth
    # every token outside is below the k-th, or has no probability at all
    closed = (has_k & (last < kth)) | (last == -torch.inf) | (K == V)
    # min_p in logit space: p_i < min_p * p_max  <=>  x_i < x_max + log(min_p)
    floor = vals[:, :1] + torch.log(min_p)
    keep &= vals >= floor
    closed |= last < floor
    masked = vals.masked_fill(~keep, -torch.inf)
    lse = masked.logsumexp(-1, keepdim=True)
    if open_lse is not None:
        lse = torch.where(closed, lse, open_lse[:, None])
    probs = (masked - lse).exp()
    # drop a token when the tokens before it already reach top_p
    keep &= (probs.cumsum(-1) - probs < top_p) | (top_p >= 1)
    # an open row is known when its nucleus ends before the tokens tied with the last
    # candidate, which may lie outside; with min_p its renormaliser is not known there
    inside = probs.masked_fill(vals == last, 0).sum(-1, keepdim=True)
    closed |= ~has_k & (min_p == 0) & (top_p < 1) & (inside >= top_p)
    return keep, closed.squeeze(-1)


def _invert(vals, ids, keep, u) -> tuple[torch.Tensor, torch.Tensor]:
    """vals [n, K] scaled logits of the tokens ids [n, K], ascending, keep [n, K] (None: all)
    -> the token whose interval of the kept tokens' cumulative probability holds u [n], and
    each row's largest logit [n]."""
    top = vals.amax(-1, keepdim=True)
    weights = (vals - top).exp()
    if keep is not None:
        weights = weights.masked_fill(~keep, 0)
    cum = weights.to(torch.float64).cumsum(-1)
    total = cum[:, -1:]
    # below the total (u * total may round up to it), so the first cumulative weight past it
    # is a kept token's
    target = torch.minimum(u[:, None] * total, total.nextafter(torch.zeros_like(total)))
    j = torch.searchsorted(cum, target, right=True).clamp(max=cum.shape[-1] - 1)
    return ids.gather(-1, j).squeeze(-1), top.squeeze(-1)


def penalised(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def plain_greedy(p) -> bool:
    """Greedy, no bias, no penalty and no logprobs: the token is the row's argmax."""
    return p.greedy and not p.logit_bias and p.logprobs is None and not penalised(p)


def _logprobs(raw: torch.Tensor, tokens: list[int], tops: list[int | None]) -> list[dict | None]:
    """Each asking row's chosen token's logprob and its `top` most likely, from the model's
    own distribution (raw [B, V], before bias, penalties and grammar)."""
    rows = [i for i, top in enumerate(tops) if top is not None]
    if not rows:
        return [None] * len(tops)
    lp = _rows(raw, rows).float().log_softmax(-1)  # [b, V]
    chosen = torch.tensor([tokens[i] for i in rows], device=lp.device)
    chosen = lp.gather(-1, chosen[:, None]).squeeze(-1).tolist()
    most = max(tops[i] for i in rows)
    values, ids = lp.topk(most) if most else (lp[:, :0], lp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    out: list[dict | None] = [None] * len(tops)
    for j, i in enumerate(rows):
        out[i] = {tokens[i]: chosen[j]}
        out[i].update(zip(ids[j][: tops[i]], values[j][: tops[i]]))
    return out


def token_logprobs(raw: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """The chosen token's logprob and the `top` most likely, from the model's distribution."""
    return _logprobs(raw[None], [token], [top])[0]
