"""LLMEngine: requests in, tokens out. `step()` = schedule -> run -> postprocess."""

import dataclasses
import itertools
import logging
import time
from pathlib import Path

import torch

from qwen35_ray.engine.block_manager import CacheManager
from qwen35_ray.engine.cache_sizing import resolve_max_model_len, size_cache
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.detokenizer import IncrementalDetokenizer
from qwen35_ray.engine.errors import RequestError, RequestFailed, request_failure
from qwen35_ray.engine.executor import Executor, InProcessExecutor, StepResult
from qwen35_ray.engine.images import EncoderCache, PrepCounters, PromptImages, prepare_images
from qwen35_ray.engine.outputs import CompletionOutput, RequestOutput
from qwen35_ray.engine.reasoning import ThinkTokens
from qwen35_ray.engine.request_checks import check_request
from qwen35_ray.engine.request_moves import RequestMoves, TokenOutsideGrammar
from qwen35_ray.engine.request_state import RequestState, model_fingerprint
from qwen35_ray.engine.resume import normalized_logprobs
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.engine.scheduler import Scheduler
from qwen35_ray.engine.sequence import Sequence
from qwen35_ray.engine.spec_stats import SpecCounters
from qwen35_ray.engine.step_plan import Plan, plan_step
from qwen35_ray.engine.step_stats import StepCounters
from qwen35_ray.engine.structured import StructuredOutputs
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.generation_config import GenerationDefaults
from qwen35_ray.model.image_processor import ImageProcessorConfig
from qwen35_ray.model.kernel_backend import check_model_kernels
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.source import resolve_model
from qwen35_ray.model.vision import has_vision, load_vision
from qwen35_ray.model.weights import tensor_fingerprint

log = logging.getLogger(__name__)

NO_MTP = (
    "speculative: the drafts come from the checkpoint's MTP layer, and this model has none "
    "(mtp_num_hidden_layers=0, or it was loaded with with_mtp=False); leave speculative out"
)


class LLMEngine(RequestMoves):
    """The scheduler, block accounting and request bookkeeping of one data-parallel rank; the
    model runs behind `executor` (engine/executor.py): in this process unless one is given,
    in which case `model` may be None."""

    def __init__(
        self,
        model,
        config,
        tokenizer,
        engine_config: EngineConfig,
        model_path=None,
        device="cpu",
        *,
        executor: Executor | None = None,
        dtype: torch.dtype | None = None,
        fingerprint: str | None = None,
    ):
        """A checkpoint at model_path with a vision tower (`model.visual.*`) takes images:
        its tower is loaded here, in the model's dtype, beside the model."""
        self.config, self.tokenizer = config, tokenizer
        self.model_path = Path(model_path) if model_path else None
        ec = engine_config
        self.max_model_len = resolve_max_model_len(config, ec)
        if executor is None:
            dtype = next(model.parameters()).dtype
            check_model_kernels(model, ec.kernels, device)
            if ec.speculative is not None and getattr(model, "mtp", None) is None:
                raise ValueError(NO_MTP)
        elif dtype is None or fingerprint is None:
            raise ValueError("an engine given an executor needs the model's dtype and fingerprint")
        self.dtype = dtype
        size = self.cache_size = size_cache(config, ec, dtype, self.max_model_len)
        vision = None
        if executor is None:
            weights = getattr(model, "weights_fingerprint", None) or tensor_fingerprint(model)
            fingerprint = model_fingerprint(config, dtype, weights)
            if config.image_token_id is not None and self.model_path and has_vision(model_path):
                vision = load_vision(self.model_path, dtype=dtype, device=device)
            executor = InProcessExecutor.create(model, config, size, ec, dtype, device, vision)
        self.fingerprint = fingerprint
        self.executor = executor
        self.cache_manager = CacheManager(
            size.num_blocks, ec.block_size, size.num_slots, size.num_snapshots
        )
        self.speculative = ec.speculative
        self.scheduler = Scheduler(
            self.cache_manager, ec.max_num_batched_tokens, ec.long_prefill_token_threshold,
            ec.speculative.k if ec.speculative else 0,
        )  # fmt: skip
        # how images become pixels and pad tokens; None: this engine takes no images (its
        # executor has no vision tower: a text checkpoint, or expert-parallel ranks, which do
        # not run one yet)
        self.image_processor = None
        if getattr(self.executor, "vision", None) is not None:
            self.image_processor = ImageProcessorConfig.from_pretrained(self.model_path)
        self.encoder_cache = EncoderCache(ec.encoder_cache_bytes)
        defaults = GenerationDefaults.read(self.model_path)
        self.eos_token_ids = set(config.eos_token_ids) | defaults.eos_token_ids
        self.structured = StructuredOutputs(tokenizer, config.vocab_size, self.eos_token_ids)
        # thinking_token_budget forces </think>; None: the model has no reasoning tokens
        self.think = ThinkTokens.of(tokenizer)
        self.generation_defaults = defaults.sampling
        self._requests: dict[str, tuple[str | None, list[int], list[Sequence]]] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()
        # requests whose images failed to encode in prepare_step, reported by finish_step
        self._failed_images: dict[str, Exception] = {}
        self.stats = {"prompt_tokens_computed": 0, "generated_tokens": 0}
        self.image_prep = PrepCounters()
        self.step_counters = StepCounters()
        self.spec_stats = SpecCounters(ec.speculative)

    @classmethod
    def from_pretrained(cls, model: str, dtype="auto", device="cpu", **engine_kwargs):
        import transformers

        ec = EngineConfig(**engine_kwargs)
        path = resolve_model(str(model))
        # before loading: building the model's MTP layer would fail without naming the setting
        if ec.speculative is not None and ModelConfig.from_hf(path).mtp_num_hidden_layers == 0:
            raise ValueError(NO_MTP)
        net, config, path = load_model(
            path, dtype=dtype, device=device, kernels=ec.kernels, with_mtp=bool(ec.speculative)
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        return cls(net, config, tokenizer, ec, path, device)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def check_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume_token_ids: list[int] | None = None,
        resume_logprobs: list | None = None,
    ) -> None:
        """Raise RequestError (a ValueError), saying what to change, for a request this engine
        cannot run."""
        check_request(
            prompt_token_ids, params, self.config.vocab_size, self.max_model_len, self.think,
            self.structured, resume_token_ids, resume_logprobs,
        )  # fmt: skip

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        prefill_only: bool = False,
        resume_token_ids: list[int] | None = None,
        resume_logprobs: list | None = None,
        images: list | PromptImages | None = None,
    ) -> None:
        """Queue a request. images: PIL images, one per `<|image_pad|>` of the prompt (in order;
        engine/images.py expands each to the image's pad tokens), or what prepare_images made
        of them, with prompt_token_ids the expanded prompt it returned. prefill_only: after its
        first token, export it as a RequestState (RequestOutput.request_state) and free its
        cache here. resume_token_ids (n=1 only): output tokens the request already has from
        elsewhere, with their logprobs when params.logprobs is set; it continues after them as
        if it had sampled them here (engine/resume.py), and its outputs hold them."""
        if prefill_only and params.n != 1:
            raise RequestError("a prefill-only request must have n=1")
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_images = images if isinstance(images, PromptImages) else None
        if images and prompt_images is None:
            prompt_token_ids, prompt_images = self.prepare_images(prompt_token_ids, images)
        self.check_request(prompt_token_ids, params, resume_token_ids, resume_logprobs)
        seqs = []
        try:
            for i in range(params.n):
                seed = params.output_seed(i)
                seq = self._sequence(request_id, i, prompt_token_ids, params, seed, prefill_only)
                if prompt_images is not None:
                    # each sequence holds its own encoder output while it prefills
                    seq.images = dataclasses.replace(prompt_images)
                    seq.rope_delta = prompt_images.rope_delta
                seqs.append(seq)
            if resume_token_ids:
                vocab = self.config.vocab_size
                logprobs = normalized_logprobs(resume_logprobs, params.logprobs, vocab)
                self._replay(seqs[0], resume_token_ids, logprobs, "resume_token_ids")
        except Exception as e:
            for seq in seqs:
                self._detok.pop(id(seq), None)
            raise request_failure(request_id, e, "being added") from e
        for seq in seqs:
            self.scheduler.add(seq)
        self._requests[request_id] = (prompt, list(prompt_token_ids), seqs)

    def prepare_images(self, prompt_token_ids: list[int], images: list):
        """(the prompt with each image's pads expanded, its PromptImages): the pixels resized
        and cut into patches, positions computed. CPU work that reads nothing of the engine's
        state but its configs, so a caller may run it in another thread (AsyncEngine does)."""
        if self.image_processor is None:
            raise RequestError(
                "this engine takes no images (the checkpoint has no vision tower, or it runs "
                "expert-parallel, which does not run one yet); send text only"
            )
        merge = self.image_processor.merge_size
        with self.image_prep.timing(len(images)):
            return prepare_images(
                prompt_token_ids, images, self.image_processor, self.config.image_token_id, merge
            )

    def _sequence(
        self, request_id, index, prompt_token_ids, params, seed: int, prefill_only=False
    ) -> Sequence:
        """A new sequence with its grammar and detokenizer, before any output."""
        seq = Sequence(
            request_id,
            index,
            list(prompt_token_ids),
            params,
            seed,
            arrival=next(self._arrivals),
            prefill_only=prefill_only,
        )
        if params.structured is not None:
            seq.grammar = self.structured.grammar(params.structured)
        self._detok[id(seq)] = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        return seq

    def _fail(self, seq: Sequence, e: Exception) -> Exception:
        """Finish seq's request with an error: seq ends with "error", its unfinished siblings
        with "abort", and each frees its cache."""
        error = request_failure(seq.request_id, e, "running")
        for s in self._requests[seq.request_id][2]:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")
        seq.finish_reason = "error"
        return error

    def abort(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        for seq in entry[2] if entry else []:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self._detok.pop(id(seq), None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        start, cpu = time.perf_counter(), time.thread_time()
        plan = self.prepare_step()
        if plan is None:
            return []
        # EngineDead when the model failed; a row whose own sampling failed has the token None
        outs = self.finish_step(plan, self.executor.execute(plan.batch))
        self.step_counters.record(
            time.perf_counter() - start, plan.num_decodes > 0, time.thread_time() - cpu
        )
        return outs

    def prepare_step(self) -> Plan | None:
        """Schedule the next step and build its batch; None when nothing is scheduled."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return None
        for s in scheduled:
            try:
                self._encode_images(s.seq, s.num_new)
            except Exception as e:
                # the vision tower failed on this request's images: it fails alone
                log.exception("encoding the images of request %r failed", s.seq.request_id)
                self._failed_images[s.seq.request_id] = self._fail(s.seq, e)
        # a failed request's sequences finished and freed their cache
        scheduled = [s for s in scheduled if not s.seq.is_finished]
        return plan_step(scheduled, self.structured, self.think, self.speculative)

    def _encode_images(self, seq: Sequence, num_new: int) -> None:
        """The tower runs at the first chunk that needs its output; prefill keeps it."""
        images, start = seq.images, seq.num_computed
        if images is None or images.embeds is not None:
            return
        if images.overlaps(start, start + num_new):
            images.embeds = self.encoder_cache.encode(images, self.executor.encode_images)

    def finish_step(self, plan: Plan, result: StepResult) -> list[RequestOutput]:
        """Apply a step's result: computed tokens, snapshots, sampled tokens, finished and
        exported requests."""
        scheduled, sampled = plan.scheduled, result.tokens
        touched, exported, failed = {}, {}, {}
        for i, s in enumerate(scheduled):
            seq = s.seq
            # a sibling failed earlier in this step and took the request down with it
            if seq.is_finished:
                continue
            if seq.num_computed < len(seq.prompt_token_ids):
                self.stats["prompt_tokens_computed"] += min(
                    s.num_new, len(seq.prompt_token_ids) - seq.num_computed
                )
            seq.num_computed += s.num_new
            if seq.images is not None and seq.num_computed >= len(seq.prompt_token_ids):
                # prefill is done: its image embeddings are no longer read
                seq.images.embeds = None
            if seq.num_computed in seq.snapshot_points and seq.num_computed > 0:
                snapshot = self.cache_manager.remember(seq, seq.num_computed)
                if snapshot is not None:
                    self.executor.copy_slot(seq.slot, snapshot)
            if i not in sampled:
                continue
            touched[seq.request_id] = True
            try:
                token, logprobs = sampled[i]
                if token is None or i in plan.failed:
                    raise RequestFailed(
                        f"request {seq.request_id!r} failed while sampling; "
                        "the server log has the details"
                    )
                # the grammar's accept and the detokenizer run here
                self.stats["generated_tokens"] += 1
                self._append(seq, token, logprobs)
                if plan.batch.spec is not None:
                    self._append_kept(seq, i, plan, result)
                if seq.prefill_only and not seq.is_finished:
                    exported[seq.request_id] = self._export(seq)
            except Exception as e:
                failed[seq.request_id] = self._fail(seq, e)
        failed.update(self._failed_images)
        touched.update(dict.fromkeys(self._failed_images, True))
        self._failed_images = {}
        outs = [self._output(rid, exported.get(rid)) for rid in touched]
        for out in outs:
            out.error = failed.get(out.request_id)
        return outs

    def _append_kept(self, seq: Sequence, i: int, plan: Plan, result: StepResult) -> None:
        """A speculative step's kept drafts after seq's first token, each as if sampled in a
        step of its own (a stop ends seq mid-draft and the rest are dropped), and the head's
        drafts for its next step."""
        more = result.more.get(i, [])
        self.spec_stats.record(plan.batch.spec, i, len(more))
        for token in more:
            if seq.is_finished:
                return
            seq.num_computed += 1
            self.stats["generated_tokens"] += 1
            self._append(seq, token, None)
        seq.drafts = result.drafts.get(i, [])
        seq.draft_probs = result.draft_probs.get(i)

    def load_stats(self) -> dict:
        """The queues and the cache now, and the running totals (read between steps)."""
        sch, cm = self.scheduler, self.cache_manager
        return {
            "running": len(sch.running),
            "waiting": len(sch.waiting),
            "waiting_prompt_tokens": sum(len(s.prompt_token_ids) for s in sch.waiting),
            # every token still to prefill: waiting sequences whole (a resumed or preempted one
            # with its outputs), running ones the rest of their prompt (what TTFT waits for)
            "pending_prompt_tokens": sum(
                s.num_tokens - s.num_computed
                for s in (*sch.waiting, *sch.running)
                if s.num_tokens - s.num_computed > 1
            ),
            "state_slots_total": cm.slots.size,
            "state_slots_free": cm.slots.num_free,
            "kv_blocks_total": cm.blocks.size,
            "kv_blocks_free": cm.blocks.num_free,
            **sch.counters(),
            "prompt_tokens_computed_total": self.stats["prompt_tokens_computed"],
            "generation_tokens_total": self.stats["generated_tokens"],
            **self.step_counters.stats(),
            **self.image_prep.stats(),
            **self.encoder_cache.stats(),
            **self.spec_stats.stats(),
        }

    def shutdown(self) -> None:
        self.executor.shutdown()

    def _append(self, seq: Sequence, token: int, logprobs: dict | None) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        if seq.grammar is not None:
            if not seq.grammar.accept(token):
                raise TokenOutsideGrammar(
                    f"token {token} escaped the grammar of {seq.request_id!r}"
                )
            # terminated: the grammar ended with a stop token (even under ignore_eos)
            if seq.grammar.is_terminated:
                return self.scheduler.finish(seq, "stop")
        if not p.ignore_eos and token in self.eos_token_ids or token in p.stop_token_ids:
            return self.scheduler.finish(seq, "stop")
        detok = self._detok[id(seq)]
        new = detok.push(token)
        seq.text += new
        if seq.thinking is not None:
            seq.thinking.observe(token, detok.char_open)
        if p.stop and new:
            window = seq.text[-(len(new) + max(map(len, p.stop))) :]
            hits = [window.find(s) for s in p.stop if s in window]
            if hits:
                cut = len(seq.text) - len(window) + min(hits)
                seq.text = seq.text[:cut]
                return self.scheduler.finish(seq, "stop")
        if (p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        ):
            self.scheduler.finish(seq, "length")

    def _output(self, request_id: str, state: RequestState | None = None) -> RequestOutput:
        prompt, ids, seqs = self._requests[request_id]
        outs = [
            CompletionOutput(
                s.index,
                s.exposed_text(),
                list(s.output_token_ids),
                list(s.output_logprobs) if s.params.logprobs is not None else None,
                s.finish_reason,
            )
            for s in seqs
        ]
        out = RequestOutput(request_id, prompt, ids, outs, seqs[0].num_cached_tokens, state)
        if (s0 := seqs[0]).scheduled_time is not None:
            out.queue_time = s0.scheduled_time - s0.arrival_time
        if out.finished or state is not None:
            self._requests.pop(request_id)
            for s in seqs:
                self._detok.pop(id(s), None)
        return out
