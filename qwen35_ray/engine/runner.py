"""ModelRunner: one step of the model over the scheduled sequences, then sampling.

Two stages with two kinds of failure. The model's forward over the whole batch (and the logits
of the rows that sample) fails the engine: raised as EngineDead, since every sequence's cache is
then in doubt. What follows is per row (grammar mask, sampling, thinking budget): a row that
fails gets the token None, which fails its request alone (LLMEngine.step).

Legend: T = tokens in the step, B = sequences sampling in the step, V = vocabulary.
"""

import logging
from concurrent.futures import Future

import torch

from qwen35_ray.engine.decode_graph import CompiledDecode
from qwen35_ray.engine.errors import EngineDead
from qwen35_ray.engine.reasoning import ThinkTokens
from qwen35_ray.engine.sampler import sample, token_logprobs
from qwen35_ray.engine.scheduler import Scheduled
from qwen35_ray.engine.sequence import Sequence
from qwen35_ray.engine.structured import Masks, StructuredOutputs, apply_bitmask
from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model,
        cache: HybridCache,
        device="cpu",
        structured: StructuredOutputs | None = None,
        compiled_decode: CompiledDecode | None = None,
    ):
        self.model = model
        self.cache = cache
        self.device = device
        self.structured = structured
        self.compiled_decode = compiled_decode
        # thinking_token_budget forces </think>; None: the model has no reasoning tokens
        self.think = ThinkTokens.of(structured.tokenizer) if structured is not None else None

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> dict[int, tuple[int | None, dict | None]]:
        """Returns {position in `scheduled`: (token, logprobs)} for the sequences that sample;
        the token is None for a sequence whose own sampling failed. Raises EngineDead, and
        nothing else, when the model failed."""
        sampling = [i for i, s in enumerate(scheduled) if s.completes]
        seqs = [scheduled[i].seq for i in sampling]
        # grammar masks depend only on tokens already sampled: filled while the model runs
        masks = self.structured.start_fill([s.grammar for s in seqs]) if self.structured else None
        try:
            logits = self._forward(scheduled, sampling)
        except Exception as e:
            raise EngineDead(f"the model failed in a step of {len(scheduled)} sequences") from e
        if not sampling:
            return {}
        tokens, logprobs = self._sample(logits, seqs, masks)
        return {i: (t, lp) for i, t, lp in zip(sampling, tokens, logprobs)}

    def _forward(self, scheduled: list[Scheduled], sampling: list[int]) -> torch.Tensor | None:
        """The model over every scheduled chunk: logits [B, V] on the CPU of the rows in
        `sampling`, None when no row samples."""
        chunks, ids = [], []
        for s in scheduled:
            if s.restore is not None:
                self.cache.copy_slot(s.restore, s.seq.slot)
            seq = s.seq
            chunks.append(SeqChunk(seq.num_computed, s.num_new, seq.slot, seq.block_table))
            ids.extend(seq.token_ids(seq.num_computed, seq.num_computed + s.num_new))
        batch = ForwardBatch.build(chunks, self.cache.block_size, self.device)
        input_ids = torch.tensor(ids, device=self.device)  # [T]
        if self.compiled_decode is not None and batch.num_decodes == batch.num_seqs:
            logits = self.compiled_decode(input_ids, batch)
            return logits[torch.tensor(sampling)] if sampling else None
        hidden = self.model(input_ids, batch, self.cache)
        if not sampling:
            return None
        rows = batch.last_token_indices[torch.tensor(sampling, device=self.device)]
        return self.model.compute_logits(hidden[rows]).cpu()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: Future | None):
        """Tokens and logprobs for seqs (logits [B, V]). A row whose grammar mask, sampling or
        thinking budget fails gets the token None, logged with its request id."""
        allowed, failed = self._constrain(logits, seqs, masks)
        tokens, logprobs = sample(logits, seqs, allowed)
        for j, seq in enumerate(seqs):
            if j in failed or tokens[j] is None:
                tokens[j] = logprobs[j] = None
                continue
            try:
                forced = self._forced(seq)
                if forced is not None:
                    tokens[j] = forced
                    if seq.params.logprobs is not None:
                        # the forced token's logprobs still come from the model's distribution
                        logprobs[j] = token_logprobs(logits[j], forced, seq.params.logprobs)
            except Exception:
                log.exception("the thinking budget failed for request %r", seq.request_id)
                tokens[j] = logprobs[j] = None
        return tokens, logprobs

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence], masks: Future | None):
        """logits [B, V] with the tokens each constrained row's grammar forbids at -inf (None:
        no row is constrained), and the rows whose mask could not be made."""
        if masks is None:
            return None, set()
        try:
            done: Masks = masks.result()
            allowed = apply_bitmask(logits, done)
        except Exception:
            failed = {j for j, s in enumerate(seqs) if s.grammar is not None and s.grammar.active}
            ids = sorted({seqs[j].request_id for j in failed})
            log.exception("the grammar masks failed for requests %s", ids)
            return None, failed
        for j, e in done.failed.items():
            log.error("the grammar mask failed for request %r", seqs[j].request_id, exc_info=e)
        return allowed, set(done.failed)

    def _forced(self, seq: Sequence) -> int | None:
        """`</think>` when seq's thinking budget is spent: the token replacing its sample."""
        budget = seq.params.thinking_token_budget
        if budget is None or self.think is None:
            return None
        # an active grammar decides every token itself; one waiting for `after` does not
        if seq.grammar is not None and seq.grammar.active:
            return None
        if seq.thinking is None:
            seq.thinking = self.think.budget(seq.prompt_token_ids, seq.output_token_ids, budget)
        return seq.thinking.forced
