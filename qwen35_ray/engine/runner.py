"""ModelRunner: one step of the model over a StepBatch, then sampling.

Two stages with two kinds of failure. The model's forward over the whole batch (and the logits
of the rows that sample) fails the engine: raised as EngineDead, since every sequence's cache is
then in doubt. What follows is per row (grammar mask, sampling, thinking budget): a row that
fails gets the token None, which fails its request alone (LLMEngine.finish_step).

Legend: T = tokens in the step, B = sequences sampling in the step, V = vocabulary.
"""

import logging
from concurrent.futures import Future

import torch

from qwen35_ray.engine.cuda_graph import DecodeGraphs
from qwen35_ray.engine.decode_graph import CompiledDecode
from qwen35_ray.engine.errors import EngineDead
from qwen35_ray.engine.executor import SampleRow, StepBatch, StepResult
from qwen35_ray.engine.sampler import sample, token_logprobs
from qwen35_ray.engine.spec_step import run_speculative
from qwen35_ray.engine.structured import Masks, apply_bitmask
from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model,
        cache: HybridCache,
        device="cpu",
        compiled_decode: CompiledDecode | None = None,
        decode_graphs: DecodeGraphs | None = None,
    ):
        self.model = model
        self.cache = cache
        self.device = device
        self.compiled_decode = compiled_decode
        self.decode_graphs = decode_graphs
        # speculative decoding's verify step as a graph (engine/verify_graph.py), CPU only
        self.compiled_verify = None

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> StepResult:
        """The sampled tokens, {chunk index: (token, logprobs)} for the rows that sample; the
        token is None for a row whose own sampling failed. Raises EngineDead, and nothing
        else, when the model failed."""
        if batch.spec is not None:
            return run_speculative(self, batch)
        try:
            logits = self._forward(batch)
        except Exception as e:
            raise EngineDead(f"the model failed in a step of {len(batch.chunks)} sequences") from e
        if not batch.sampling:
            return StepResult({})
        tokens, logprobs = self._sample(logits, batch.rows, batch.masks)
        return StepResult({i: (t, lp) for i, t, lp in zip(batch.sampling, tokens, logprobs)})

    def _forward(self, step: StepBatch) -> torch.Tensor | None:
        """The model over every chunk: logits [B, V] of the sampling rows, on the model's
        device (sampling runs there), None when no row samples."""
        sampling = step.sampling
        graphs = self.decode_graphs
        if step.embeds or any(c.mrope is not None for c in step.chunks):
            # image tokens (even a one-token chunk of them, which counts as a decode): their
            # embeddings and multimodal positions go through the eager PagedStep path
            batch = ForwardBatch.build(step.chunks, self.cache.block_size, self.device)
            input_ids = torch.tensor(step.input_ids, device=self.device)  # [T]
            embeds = None
            if step.embeds:
                rows = torch.cat([r for r, _ in step.embeds]).to(self.device)
                embeds = rows, torch.cat([v.to(self.device) for _, v in step.embeds])
            return self._eager(input_ids, batch, sampling, embeds)
        if graphs is not None and (bucket := graphs.bucket(step.chunks)) is not None:
            logits = graphs(step.chunks, step.input_ids, bucket)
            if sampling == list(range(len(step.chunks))):
                # every row samples (the usual decode step): the graph's buffer as it is, read
                # before the next step writes it; gathering it would copy B x V floats
                return logits
            return logits[torch.tensor(sampling, device=self.device)] if sampling else None
        batch = ForwardBatch.build(step.chunks, self.cache.block_size, self.device)
        input_ids = torch.tensor(step.input_ids, device=self.device)  # [T]
        compiled = self.compiled_decode
        if compiled is None or not compiled.ready or batch.num_decodes == 0:
            return self._eager(input_ids, batch, sampling)
        D = batch.num_decodes
        logits = compiled(input_ids[:D], batch if D == batch.num_seqs else batch.parts[0])
        if D == batch.num_seqs:
            # the graph runs the model's layers (hidden_states); closing the step is left here
            if (load := getattr(self.model, "expert_load", None)) is not None:
                load.end_step()
            return logits[torch.tensor(sampling)] if sampling else None
        # a step that adds prompt chunks to decodes (each arrival over HTTP makes one): the
        # decodes through the graph, the chunks eagerly (their own states and blocks, so the
        # order is free); eagerly the decode rows would cost their share of a step's many
        # small ops again. The eager forward closes the step's expert load.
        rest = ForwardBatch.build(step.chunks[D:], self.cache.block_size, self.device)
        tail = self._eager(input_ids[D:], rest, [i - D for i in sampling if i >= D])
        head = logits[torch.tensor([i for i in sampling if i < D], dtype=torch.long)]
        return head if tail is None else torch.cat([head, tail])

    def _eager(self, input_ids: torch.Tensor, batch: ForwardBatch, sampling: list[int],
               embeds=None):  # fmt: skip
        hidden = self.model(input_ids, batch, self.cache, embeds)
        if not sampling:
            return None
        rows = batch.last_token_indices[torch.tensor(sampling, device=self.device)]
        return self.model.compute_logits(hidden[rows])

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow], masks):
        """Tokens and logprobs for the rows (logits [B, V]). A row whose grammar mask or
        sampling fails gets the token None, logged with its request id."""
        allowed, failed = self._constrain(logits, rows, masks)
        tokens, logprobs = sample(logits, rows, allowed)
        for j, row in enumerate(rows):
            if j in failed or tokens[j] is None:
                tokens[j] = logprobs[j] = None
                continue
            if row.forced is not None:
                tokens[j] = row.forced
                if row.params.logprobs is not None:
                    # the forced token's logprobs still come from the model's distribution
                    logprobs[j] = token_logprobs(logits[j], row.forced, row.params.logprobs)
        return tokens, logprobs

    def _constrain(self, logits: torch.Tensor, rows: list[SampleRow], masks):
        """logits [B, V] with the tokens each constrained row's grammar forbids at -inf (None:
        no row is constrained), and the rows whose mask could not be made."""
        if masks is None:
            return None, set()
        try:
            done: Masks = masks.result() if isinstance(masks, Future) else masks
            allowed = apply_bitmask(logits, done)
        except Exception:
            failed = {j for j, r in enumerate(rows) if r.constrained}
            ids = sorted({rows[j].request_id for j in failed})
            log.exception("the grammar masks failed for requests %s", ids)
            return None, failed
        for j, e in done.failed.items():
            log.error("the grammar mask failed for request %r", rows[j].request_id, exc_info=e)
        return allowed, set(done.failed)
