"""Plan: one scheduled step turned into the StepBatch an executor runs.

Everything that needs the driver's Sequence objects is decided here, before the model runs:
which rows sample, what their sampling needs (SampleRow), the token a spent thinking budget
forces, and the grammar masks (filled on a worker thread while the model runs).
"""

import logging
from dataclasses import dataclass

from qwen35_ray.engine.executor import SampleRow, SpecBatch, StepBatch
from qwen35_ray.engine.reasoning import ThinkTokens
from qwen35_ray.engine.scheduler import Scheduled
from qwen35_ray.engine.sequence import Sequence
from qwen35_ray.engine.spec_accept import draft_mode
from qwen35_ray.engine.speculative import SpeculativeConfig
from qwen35_ray.engine.structured import StructuredOutputs
from qwen35_ray.model.batch import SeqChunk

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """One step as scheduled, and the batch the executor runs for it."""

    scheduled: list[Scheduled]
    batch: StepBatch
    failed: set[int]  # chunk indices whose row could not be prepared (the thinking budget)
    # sequences computing one token on top of their state (as ForwardBatch counts decodes)
    num_decodes: int = 0


def plan_step(
    scheduled: list[Scheduled],
    structured: StructuredOutputs,
    think: ThinkTokens | None,
    spec: SpeculativeConfig | None = None,
) -> Plan:
    """spec: speculative decoding is on; each running sequence's decode becomes a verify row
    of its last token and its drafts, after the step's prompt chunks (SpecBatch)."""
    batch, failed, decodes = StepBatch(), set(), 0
    if spec is not None:
        # stable: the prompt chunks keep their order, the verify rows follow
        scheduled = sorted(scheduled, key=verifies)
        batch.spec = SpecBatch(spec.k, sum(not verifies(s) for s in scheduled))
    for i, s in enumerate(scheduled):
        seq = s.seq
        decodes += s.num_new == 1 and seq.num_computed > 0
        if s.restore is not None:
            batch.restores.append((s.restore, seq.slot))
        if spec is not None and verifies(s):
            _verify_row(batch, seq, spec.k)
            batch.sampling.append(i)
            batch.rows.append(_row(seq, think, i, failed))
            continue
        if spec is not None:
            end = seq.num_computed + s.num_new
            batch.spec.next_ids.append(seq.token_ids(seq.num_computed + 1, end + 1))
        batch.chunks.append(chunk(seq, s.num_new))
        if seq.images is not None and seq.images.overlaps(
            seq.num_computed, seq.num_computed + s.num_new
        ):
            rows, values = seq.images.embeds_of(seq.num_computed, seq.num_computed + s.num_new)
            batch.embeds.append((rows + len(batch.input_ids), values))
        batch.input_ids.extend(seq.token_ids(seq.num_computed, seq.num_computed + s.num_new))
        if s.completes:
            batch.sampling.append(i)
            batch.rows.append(_row(seq, think, i, failed))
    # grammar masks depend only on tokens already sampled: filled while the model runs
    batch.masks = structured.start_fill([scheduled[i].seq.grammar for i in batch.sampling])
    return Plan(scheduled, batch, failed, decodes)


def verifies(s: Scheduled) -> bool:
    """With speculative decoding, s is a verify row: a running sequence's one last token
    (not an image's, whose embedding only a prompt chunk carries)."""
    seq = s.seq
    if not (s.completes and s.num_new == 1 and seq.num_computed > 0):
        return False
    return seq.images is None or not seq.images.overlaps(seq.num_computed, seq.num_tokens)


def _verify_row(batch: StepBatch, seq: Sequence, k: int) -> None:
    """seq's last token and k drafts: those its previous step made, else (its first decode
    here after an import) its last token repeated, which verifying keeps only where right."""
    last = seq.token_ids(seq.num_computed, seq.num_tokens)
    drafts = seq.drafts if len(seq.drafts) == k else last * k
    batch.spec.drafts.append(list(drafts))
    # the head's distributions the drafts were drawn from (sampled requests only)
    batch.spec.q.append(seq.draft_probs if len(seq.drafts) == k else None)
    batch.spec.keeps.append(draft_mode(seq.params) is not None)
    batch.chunks.append(chunk(seq, k + 1))
    batch.input_ids.extend(last + list(drafts))


def _row(seq: Sequence, think: ThinkTokens | None, i: int, failed: set[int]) -> SampleRow:
    row = sample_row(seq, think)
    if row is None:
        failed.add(i)
        row = SampleRow(seq.request_id, seq.params, seq.seed, len(seq.output_token_ids))
    return row


def chunk(seq: Sequence, num_new: int) -> SeqChunk:
    """seq's next num_new tokens as a SeqChunk; one that holds prompt tokens of a prompt with
    images carries their multimodal positions."""
    start = seq.num_computed
    images = seq.images
    mrope = None
    if images is not None and start < images.mrope.shape[1]:
        mrope = images.rope(start, start + num_new)
    return SeqChunk(start, num_new, seq.slot, seq.block_table, seq.rope_delta, mrope)


def sample_row(seq: Sequence, think: ThinkTokens | None) -> SampleRow | None:
    """What sampling needs of seq; None (logged) when its thinking budget failed. The token
    history travels only for the penalties that read it."""
    p = seq.params
    try:
        forced = forced_token(seq, think)
    except Exception:
        log.exception("the thinking budget failed for request %r", seq.request_id)
        return None
    penalised = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
    return SampleRow(
        seq.request_id,
        p,
        seq.seed,
        len(seq.output_token_ids),
        list(seq.prompt_token_ids) if p.repetition_penalty != 1.0 else [],
        list(seq.output_token_ids) if penalised else [],
        forced,
        seq.grammar is not None and seq.grammar.active,
    )


def forced_token(seq: Sequence, think: ThinkTokens | None) -> int | None:
    """`</think>` when seq's thinking budget is spent: the token replacing its sample."""
    budget = seq.params.thinking_token_budget
    if budget is None or think is None:
        return None
    # an active grammar decides every token itself; one waiting for `after` does not
    if seq.grammar is not None and seq.grammar.active:
        return None
    if seq.thinking is None:
        seq.thinking = think.budget(seq.prompt_token_ids, seq.output_token_ids, budget)
    return seq.thinking.forced
