"""LLMServer: one replica holding an AsyncEngine, streaming per-step deltas to the ingress."""

import logging
import uuid
from collections.abc import AsyncIterator

from ray import serve

from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.errors import OpenAIError

log = logging.getLogger("qwen35_ray.serving")


class Overloaded(OpenAIError):
    def __init__(self, message: str):
        super().__init__(message, status=503, type="server_overloaded")


class LLMServer:
    """Deployed by the builder; methods are called through a Serve handle."""

    def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config)
        self.config = cfg
        engine = LLMEngine.from_pretrained(
            cfg.model, dtype=cfg.dtype, device=cfg.device, **cfg.engine.model_dump()
        )
        self.engine = AsyncEngine(engine)
        # queued prompts beyond this are refused with 503 instead of waiting unboundedly
        self.max_waiting = cfg.max_waiting_requests
        if self.max_waiting is None:
            self.max_waiting = 4 * cfg.engine.max_num_seqs
        self.counters = {
            "requests_total": 0,
            "requests_aborted_total": 0,
            "requests_rejected_total": 0,
        }
        log.info("LLMServer ready: %s (%s)", cfg.model, engine.dtype)

    def _params(self, prompt_token_ids: list[int], params: dict) -> SamplingParams:
        """Refuse work beyond the queue limit (503) and invalid requests (400)."""
        engine = self.engine.engine
        if len(engine.scheduler.waiting) >= self.max_waiting:
            self.counters["requests_rejected_total"] += 1
            raise Overloaded("the server is overloaded; retry later")
        try:
            sp = SamplingParams(**params)
            engine.check_request(prompt_token_ids, sp)
        except (TypeError, ValueError) as e:
            raise OpenAIError(str(e), status=400) from e
        return sp

    async def generate(
        self, prompt_token_ids: list[int], params: dict, request_id: str | None = None
    ) -> AsyncIterator[dict]:
        """Yield {"outputs": [{index, text, token_ids, logprobs, finish_reason}], ...} deltas:
        the text and tokens each output gained in one engine step."""
        sp = self._params(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        self.counters["requests_total"] += 1
        async for delta in self._deltas(self.engine.generate(request_id, prompt_token_ids, sp)):
            yield delta

    async def _deltas(self, outputs, seen: dict[int, tuple[int, int]] | None = None):
        """RequestOutputs -> what each output gained since the last one (or since `seen`:
        index -> (tokens, characters) the client already has)."""
        seen = dict(seen or {})
        finished = False
        try:
            async for out in outputs:
                deltas = []
                for o in out.outputs:
                    n_tok, n_txt = seen.get(o.index, (0, 0))
                    if len(o.token_ids) == n_tok and o.finish_reason is None:
                        continue
                    deltas.append(
                        {
                            "index": o.index,
                            "text": o.text[n_txt:],
                            "token_ids": o.token_ids[n_tok:],
                            "logprobs": o.logprobs[n_tok:] if o.logprobs is not None else None,
                            "finish_reason": o.finish_reason,
                        }
                    )
                    seen[o.index] = (len(o.token_ids), len(o.text))
                finished = out.finished or out.request_state is not None
                yield {"outputs": deltas, "num_cached_tokens": out.num_cached_tokens}
        finally:
            if not finished:
                self.counters["requests_aborted_total"] += 1

    def stats(self) -> dict:
        e = self.engine.engine
        cm = e.cache_manager
        return {
            **self.counters,
            "running": len(e.scheduler.running),
            "waiting": len(e.scheduler.waiting),
            "state_slots_total": cm.slots.size,
            "state_slots_free": cm.slots.num_free,
            "kv_blocks_total": cm.blocks.size,
            "kv_blocks_free": cm.blocks.num_free,
            "preemptions_total": e.scheduler.num_preemptions,
            "prompt_tokens_computed_total": e.stats["prompt_tokens_computed"],
            "generation_tokens_total": e.stats["generated_tokens"],
        }

    def record_routing_stats(self) -> dict:
        """Polled by Serve for the request routers (and read by the ingress's /metrics)."""
        e = self.engine.engine
        return {
            **self.stats(),
            "waiting_prompt_tokens": sum(len(s.prompt_token_ids) for s in e.scheduler.waiting),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    def check_health(self) -> None:
        if self.engine.errored is not None:
            raise RuntimeError("engine loop failed") from self.engine.errored
