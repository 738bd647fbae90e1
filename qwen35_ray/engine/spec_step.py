"""One step of speculative decoding with the MTP head (issue 22), on the model's side.

The step's prompt chunks lead the batch and run in an ordinary forward; its verify rows (each
a running sequence's last token and the k drafts the head made for it in its previous step)
run in one verification forward (model/verify.py) that keeps every position's GDN states. Then:

1. Sampling. Each row's first token is sampled as in a step without speculation (grammar
   masks, penalties, logprobs, the thinking budget: engine/runner.py), from the logits at its
   last prompt token or at its verify row's first position.
2. Acceptance. A verify row that may keep drafts (plain greedy, engine/step_plan.py) keeps
   them while they equal the main model's argmax (engine/spec_accept.py); the others keep
   none, which is exactly decoding one token. `commit` gives each verify row's GDN slots the
   states after its last kept position; the K/V of rejected positions stays past the
   sequence's length, where the next step writes over it.
3. The head's pass. Position p of the MTP layer reads the main hidden state at p and the
   token at p + 1, so it runs over every position this step computed whose next token is now
   known (a prompt chunk's, and a verify row's kept positions), which writes its own K/V
   there; its output at a sequence's last position drafts the token after the one just
   sampled. Drafts 2..k each run the layer once more, one position further, on its own output
   and the draft before (recursive MTP); the K/V they write past the kept positions is
   rewritten by the next step's pass.

Legend: B = verify rows, k = drafts per row, V = vocabulary, H = hidden size.
"""

import torch

from qwen35_ray.engine.errors import EngineDead
from qwen35_ray.engine.executor import StepBatch, StepResult
from qwen35_ray.engine.spec_accept import (
    accept_greedy,
    accept_sampled,
    draft_mode,
    sampling_probs,
    spec_uniforms,
)
from qwen35_ray.engine.spec_draft import draft
from qwen35_ray.engine.spec_greedy import try_greedy
from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.slot_verify import (
    slot_verifies,
    slot_verify_inputs,
    store_slot_verify,
    verify_logits,
)


def run_speculative(runner, batch: StepBatch) -> StepResult:
    """The step's tokens (StepResult.tokens: each sampling row's first token; .more: the kept
    tokens after it), and the head's next drafts for every sequence that sampled (.drafts)."""
    if (result := try_greedy(runner, batch)) is not None:
        return result  # verify rows of greedy requests only: one forward
    spec = batch.spec
    P, k = spec.num_prompt_chunks, spec.k
    model, cache, device = runner.model, runner.cache, runner.device
    chunks, block_size = batch.chunks, cache.block_size
    T = sum(c.num_new for c in chunks[:P])  # the prompt chunks' tokens
    verify = None
    try:
        hidden_p = hidden_v = None
        first = []  # [B', V] logits of each sampling row's first token, in sampling order
        if P:
            fb = ForwardBatch.build(chunks[:P], block_size, device)
            embeds = None
            if batch.embeds:  # image rows: every one in the prompt chunks, which lead
                rows = torch.cat([r for r, _ in batch.embeds]).to(device)
                embeds = rows, torch.cat([v.to(device) for _, v in batch.embeds])
            hidden_p = model(torch.tensor(batch.input_ids[:T], device=device), fb, cache, embeds)
            last = fb.last_token_indices[[i for i in batch.sampling if i < P]]
            first.append(model.compute_logits(hidden_p[last]))
        if len(chunks) > P:
            vb = ForwardBatch.build(chunks[P:], block_size, device)
            ids = torch.tensor(batch.input_ids[T:], device=device)
            logits_v, hidden_v, verify = _verify(runner, ids, vb, k + 1)
            logits_v = logits_v.unflatten(0, (-1, k + 1))  # [B, k+1, V]
            first.append(logits_v[:, 0])
    except Exception as e:
        raise EngineDead(f"the model failed in a speculative step of {len(chunks)} rows") from e
    tokens, logprobs = runner._sample(torch.cat(first), batch.rows, batch.masks)
    V0 = len(tokens) - (len(chunks) - P)  # every verify row samples, after the prompt rows
    emitted = []
    if verify is not None:
        emitted = _accept(spec, logits_v, tokens[V0:], batch.rows[V0:])
        # a row whose sampling failed keeps its last token's states; its request fails
        verify([max(len(e), 1) for e in emitted])
        for j, e in enumerate(emitted):
            if e:
                tokens[V0 + j] = e[0]
    result = StepResult({i: (t, lp) for i, t, lp in zip(batch.sampling, tokens, logprobs)})
    for j, e in enumerate(emitted):
        if len(e) > 1:
            result.more[P + j] = e[1:]
    try:
        draft(runner, batch, tokens, hidden_p, hidden_v, emitted, result)
    except Exception as e:
        raise EngineDead(f"the MTP head failed in a step of {len(chunks)} sequences") from e
    return result


def _verify(runner, ids: torch.Tensor, vb: ForwardBatch, width: int):
    """The verify rows' forward: (logits [B * width, V], final hidden states, commit), where
    commit(kept) keeps each row's states after its last kept token. On CPU with DecodeKV
    copies a SlotVerify step, compiled once runner.compiled_verify is ready; else VerifyStep."""
    model, cache = runner.model, runner.cache
    if not slot_verifies(vb, cache):
        hidden, step = model.verify(ids, vb, cache, width)
        return model.compute_logits(hidden), hidden, step.commit
    inputs = slot_verify_inputs(vb, cache, len(model.config.attention_layers), width)
    compiled = runner.compiled_verify
    if compiled is not None and compiled.ready:
        logits, hidden, *outputs = compiled(ids, *inputs)
    else:
        logits, hidden, *outputs = verify_logits(model, width, ids, *inputs)
    if (load := getattr(model, "expert_load", None)) is not None:
        load.end_step()
    return logits, hidden, lambda kept: store_slot_verify(vb, cache, outputs, kept)


def _accept(spec, logits_v, firsts: list[int | None], rows) -> list[list[int]]:
    """Each verify row's emitted tokens: for a row that keeps no drafts, its sampled token;
    else its kept drafts and the token after them, by the greedy or the sampled rule
    (engine/spec_accept.py). None for a row whose sampling failed."""
    out = [[t] if t is not None else [] for t in firsts]
    modes = [draft_mode(r.params) if t is not None else None for r, t in zip(rows, firsts)]
    greedy = [j for j, m in enumerate(modes) if m == "greedy"]
    if greedy:
        target = logits_v[greedy].argmax(-1)  # [b, k + 1]
        drafts = torch.tensor([spec.drafts[j] for j in greedy], device=target.device)
        for j, tokens in zip(greedy, accept_greedy(drafts, target)):
            out[j] = tokens  # the first is the sample: the argmax of the same logits
    for j in (j for j, m in enumerate(modes) if m == "sampled"):
        row, drafts = rows[j], torch.tensor([spec.drafts[j]])
        p = sampling_probs(logits_v[j], row.params)  # [k + 1, V]
        q = spec.q[j]
        if q is None:  # drafts not drawn from the head (filler): drawn from themselves
            q = torch.nn.functional.one_hot(drafts[0], p.shape[-1]).float()
        accept_u, draw_u = spec_uniforms(row.seed, row.position, spec.k)
        out[j] = accept_sampled(drafts, q[None].to(p), p[None], [accept_u], [draw_u])[0]
    return out
