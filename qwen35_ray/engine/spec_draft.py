"""The MTP head's part of a speculative step (engine/spec_step.py): its pass over the positions
the step computed whose next token is now known, and the k drafts of each sequence that sampled.

- A prompt chunk's positions: an eager pass (PagedStep) over the main hidden states and the
  tokens after them (the sampled one after the last, for the chunk that completes a prompt).
  It writes the head's K/V at every position, but its output is only wanted at the last one
  (a draft) and its MoE runs there alone (MultiTokenPredictor.forward's rows).
- A verify row's kept positions C .. C+a: one pass of uniform width k + 1 over all the row's
  positions, the emitted tokens after them (the last repeated past them); the K/V past the kept
  positions is rewritten by the next step before anything reads it.
- Drafts: the first from the head's output at a sequence's last position; each next one from
  the head once more, one position further, on its own output and the draft before.

On a CPU cache with DecodeKV copies (the torch kernels) the head's steps run as SlotVerify steps
(model/slot_verify.py), compiled with the verify step (engine/verify_graph.py); elsewhere
eagerly through PagedStep.
"""

import torch

from qwen35_ray.engine.executor import StepBatch, StepResult
from qwen35_ray.engine.spec_accept import (
    DRAFT_STREAM,
    draft_mode,
    inverse_cdf,
    sampling_probs,
    spec_uniform,
)
from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.slot_verify import mtp_logits, slot_mtp_inputs, store_slot_mtp


def draft(runner, batch: StepBatch, tokens, hidden_p, hidden_v, emitted, result: StepResult):
    """Run the head over the step's positions and put k drafts for each sequence that sampled
    into result.drafts (and the distributions of a sampled request's into .draft_probs)."""
    spec, cache, device = batch.spec, runner.cache, runner.device
    P, k = spec.num_prompt_chunks, spec.k
    row_of = {i: (batch.rows[n], tokens[n]) for n, i in enumerate(batch.sampling)}
    who, heads, logits, h = [], [], [], []  # per drafting sequence: (index, row, position)
    # the prompt chunks, eagerly
    chunks, ids, hidden, last = [], [], [], []
    start = 0
    for i, c in enumerate(batch.chunks[:P]):
        nxt = list(spec.next_ids[i])
        row, token = row_of.get(i, (None, None))
        if token is not None:
            nxt.append(token)
        if nxt:
            chunks.append(_part(c, len(nxt)))
            ids += nxt
            hidden.append(hidden_p[start : start + len(nxt)])
            if token is not None:
                last.append(len(chunks) - 1)
                who.append((i, row, row.position + 1))
        start += c.num_new
    if chunks:
        fb = ForwardBatch.build(chunks, cache.block_size, device)
        # the head's output at each drafting sequence's last position alone (its K/V at all)
        at = fb.last_token_indices[torch.tensor(last, dtype=torch.long, device=device)]
        out = runner.model.mtp_forward(torch.tensor(ids, device=device), torch.cat(hidden), fb,
                                       cache, at)  # fmt: skip
        logits.append(runner.model.compute_logits(out))
        h.append(out)
        heads += [chunks[n] for n in last]
    # the verify rows, at uniform width
    rows = [j for j, e in enumerate(emitted) if e]
    if rows:
        w = k + 1
        chunks = [batch.chunks[P + j] for j in rows]
        ids = [t for j in rows for t in emitted[j] + emitted[j][-1:] * (w - len(emitted[j]))]
        hidden = hidden_v.unflatten(0, (-1, w))[rows].flatten(0, 1)
        kept = [len(emitted[j]) for j in rows]
        lg, out = head_step(runner, chunks, torch.tensor(ids, device=device), hidden, kept)
        at = torch.tensor([n * w + a - 1 for n, a in enumerate(kept)], device=device)
        logits.append(lg[at])
        h.append(out[at])
        heads += [_part(c, a) for c, a in zip(chunks, kept)]
        who += [(P + j, row_of[P + j][0], row_of[P + j][0].position + a)
                for j, a in zip(rows, kept)]  # fmt: skip
    if not who:
        return
    logits, h = torch.cat(logits), torch.cat(h)
    sampled = [n for n, (_, row, _) in enumerate(who) if draft_mode(row.params) == "sampled"]
    out, probs = [[] for _ in who], {n: [] for n in sampled}
    for step in range(k):
        if step:
            # one position on: the head over its own output and the draft before
            pos = [SeqChunk(c.num_computed + c.num_new - 1 + step, 1, c.state_slot,
                            c.block_table, c.rope_delta) for c in heads]  # fmt: skip
            prev = torch.tensor([d[-1] for d in out], device=device)
            logits, h = head_step(runner, pos, prev, h, [1] * len(pos))
        picked = logits.argmax(-1).tolist()
        for n in sampled:
            _, row, position = who[n]
            q = sampling_probs(logits[n : n + 1], row.params)[0]
            probs[n].append(q)
            picked[n] = inverse_cdf(q, spec_uniform(row.seed, position + step, DRAFT_STREAM))
        for d, t in zip(out, picked):
            d.append(t)
    for n, (i, _, _) in enumerate(who):
        result.drafts[i] = out[n]
        if n in probs:
            result.draft_probs[i] = torch.stack(probs[n])


def head_step(runner, chunks: list[SeqChunk], ids, hidden, kept: list[int]):
    """The head over chunks of one width after cached state: (logits [T, V], hidden [T, H]).
    Its K/V is written for every position; kept[b]: those of chunk b that stand."""
    model, cache = runner.model, runner.cache
    fb = ForwardBatch.build(chunks, cache.block_size, runner.device)
    if not cache.decode_kv or fb.mrope_positions is not None:
        h = model.mtp_forward(ids, hidden, fb, cache)
        return model.compute_logits(h), h
    width = chunks[0].num_new
    first = len(model.config.attention_layers)
    inputs = slot_mtp_inputs(fb, cache, first, width)
    compiled = runner.compiled_verify
    if compiled is not None and compiled.ready and width in compiled.heads:
        logits, h, k, v = compiled.heads[width](ids, hidden, *inputs)
    else:
        logits, h, k, v = mtp_logits(model, width, ids, hidden, *inputs)
    store_slot_mtp(fb, cache, first, k, v, kept)
    return logits, h


def _part(c: SeqChunk, n: int) -> SeqChunk:
    """The first n positions of chunk c."""
    mrope = None if c.mrope is None else c.mrope[:, :n]
    return SeqChunk(c.num_computed, n, c.state_slot, c.block_table, c.rope_delta, mrope)
