"""ModelRunner: one step of the model over the scheduled sequences, then sampling.

Legend: T = tokens in the step, B = scheduled sequences.
"""

import torch

from qwen35_ray.engine.decode_graph import CompiledDecode
from qwen35_ray.engine.reasoning import ThinkTokens
from qwen35_ray.engine.sampler import _logprobs, sample
from qwen35_ray.engine.scheduler import Scheduled
from qwen35_ray.engine.sequence import Sequence
from qwen35_ray.engine.structured import StructuredOutputs, apply_bitmask
from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache


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
    def run(self, scheduled: list[Scheduled]) -> dict[int, tuple[int, dict | None]]:
        """Returns {position in `scheduled`: (token, logprobs)} for the sequences that sample."""
        chunks, ids = [], []
        for s in scheduled:
            if s.restore is not None:
                self.cache.copy_slot(s.restore, s.seq.slot)
            seq = s.seq
            chunks.append(SeqChunk(seq.num_computed, s.num_new, seq.slot, seq.block_table))
            ids.extend(seq.token_ids(seq.num_computed, seq.num_computed + s.num_new))
        batch = ForwardBatch.build(chunks, self.cache.block_size, self.device)
        sampling = [i for i, s in enumerate(scheduled) if s.completes]
        seqs = [scheduled[i].seq for i in sampling]
        # grammar masks depend only on tokens already sampled: filled while the model runs
        masks = self.structured.start_fill([s.grammar for s in seqs]) if self.structured else None
        input_ids = torch.tensor(ids, device=self.device)
        if self.compiled_decode is not None and batch.num_decodes == batch.num_seqs:
            logits = self.compiled_decode(input_ids, batch)[torch.tensor(sampling)]
        else:
            hidden = self.model(input_ids, batch, self.cache)
            if not sampling:
                return {}
            rows = batch.last_token_indices[torch.tensor(sampling, device=self.device)]
            logits = self.model.compute_logits(hidden[rows]).cpu()
        if not sampling:
            return {}
        allowed = apply_bitmask(logits, masks.result()) if masks is not None else None
        tokens, logprobs = sample(logits, seqs, allowed)
        self._force(logits, seqs, tokens, logprobs)
        return {i: (t, lp) for i, t, lp in zip(sampling, tokens, logprobs)}

    def _force(self, logits: torch.Tensor, seqs: list[Sequence], tokens, logprobs) -> None:
        """Replace, in place, the sampled token of each sequence whose thinking budget is spent
        by `</think>`; its logprobs still come from the model's distribution (logits [B, V])."""
        for j, seq in enumerate(seqs):
            p = seq.params
            if p.thinking_token_budget is None or self.think is None:
                continue
            # an active grammar decides every token itself; one waiting for `after` does not
            if seq.grammar is not None and seq.grammar.active:
                continue
            if seq.thinking is None:
                seq.thinking = self.think.budget(
                    seq.prompt_token_ids, seq.output_token_ids, p.thinking_token_budget
                )
            forced = seq.thinking.forced
            if forced is None or tokens[j] is None:
                continue
            tokens[j] = forced
            if p.logprobs is not None:
                logprobs[j] = _logprobs(logits[j], forced, p.logprobs)
