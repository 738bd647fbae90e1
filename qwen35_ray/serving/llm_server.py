"""LLMServer: one replica holding an AsyncEngine, streaming per-step deltas to the ingress.

Admission: a replica queues at most `max_waiting_requests` prompts and
`max_waiting_prompt_tokens` prompt tokens beyond what runs; more is refused at once with a 503
and Retry-After, so a burst gets fast answers instead of waiting in an unbounded queue.

Failure: a request's own failure ends that request (400 for what it caused, 500 for ours, with
its request id); the engine goes on. If the model itself fails, the engine is dead: open and
later requests get a 503, check_health fails, and the replica process exits so that Serve
stops routing to it and replaces it at once (Serve's health check would take three periods).
"""

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator

from ray import serve

from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.errors import EngineDead, RequestError, RequestFailed
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.errors import OpenAIError, Overloaded, errors_as_items

log = logging.getLogger("qwen35_ray.serving")

# seconds a replica whose engine died keeps answering (its open streams get their 503) before
# it exits
DEAD_REPLICA_EXIT_S = 1.0


class LLMServer:
    """Deployed by the builder; methods are called through a Serve handle."""

    def __init__(self, config: dict):
        cfg = AppConfig.model_validate(config)
        self.config = cfg
        engine = LLMEngine.from_pretrained(
            cfg.model, dtype=cfg.dtype, device=cfg.device, **cfg.engine.model_dump()
        )
        self.engine = AsyncEngine(engine)
        self.max_waiting, self.max_waiting_tokens = cfg.waiting_limits
        self.counters = {
            "requests_total": 0,
            "requests_aborted_total": 0,
            "requests_rejected_total": 0,
            "requests_failed_total": 0,
        }
        self._exiting = False
        log.info("LLMServer ready: %s (%s)", cfg.model, engine.dtype)

    def _admit(self, num_prompt_tokens: int) -> None:
        """Refuse work (503) when this replica's queue is full or its engine has died.
        A request is always admitted to an empty queue, however long its prompt."""
        if self.engine.dead:
            self._engine_died()
        s = self.engine.stats()
        # requests queued but not yet applied count as waiting; those the free state slots
        # will take at the next step do not wait for long
        queued = max(0, s["waiting"] - s["state_slots_free"])
        full = queued >= self.max_waiting or (
            queued > 0 and s["waiting_prompt_tokens"] + num_prompt_tokens > self.max_waiting_tokens
        )
        if full:
            self.counters["requests_rejected_total"] += 1
            raise Overloaded("the server is overloaded; retry later")

    async def _params(self, prompt_token_ids: list[int], params: dict) -> SamplingParams:
        """Validate (400) off the event loop, since a grammar may take a while to compile,
        then admit (503). Nothing awaits between admission and the caller queueing the
        request, so a burst cannot pass the check all at once."""
        try:
            sp = SamplingParams(**params)
        except (TypeError, ValueError) as e:
            raise OpenAIError(str(e), status=400) from e
        check = asyncio.to_thread(self.engine.engine.check_request, prompt_token_ids, sp)
        try:
            await asyncio.wait_for(check, self.config.grammar_compile_timeout_s)
        except TimeoutError:
            raise OpenAIError(
                f"the request's grammar (response_format or forced tool call) took over "
                f"{self.config.grammar_compile_timeout_s:g} s to compile; simplify its schema",
                status=400,
            ) from None
        except (TypeError, ValueError) as e:
            raise OpenAIError(str(e), status=400) from e
        self._admit(len(prompt_token_ids))
        return sp

    @errors_as_items
    async def generate(
        self, prompt_token_ids: list[int], params: dict, request_id: str | None = None
    ) -> AsyncIterator[dict]:
        """Yield {"outputs": [{index, text, token_ids, logprobs, finish_reason}], ...} deltas:
        the text and tokens each output gained in one engine step. An error is the last item,
        {"error": ..., "headers": ...} (errors.raise_error_item raises it again)."""
        sp = await self._params(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        self.counters["requests_total"] += 1
        async for delta in self._deltas(self.engine.generate(request_id, prompt_token_ids, sp)):
            yield delta

    async def _deltas(self, outputs, seen: dict[int, tuple[int, int]] | None = None):
        """RequestOutputs -> what each output gained since the last one (or since `seen`:
        index -> (tokens, characters) the client already has). Engine failures become the
        client's error: 400 for what the request caused, 500 for ours, 503 if the engine died."""
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
        except RequestError as e:
            finished = True
            raise OpenAIError(str(e), status=400) from None
        except RequestFailed as e:
            finished = True
            self.counters["requests_failed_total"] += 1
            raise OpenAIError(f"internal error: {e}", status=500) from None
        except EngineDead:
            finished = True
            self._engine_died()
        finally:
            if not finished:
                self.counters["requests_aborted_total"] += 1

    def _engine_died(self):
        """The replica cannot serve anymore: say so (503), and leave so Serve replaces it."""
        if not self._exiting and _in_replica():
            self._exiting = True
            log.error("the engine failed; this replica exits so that Serve replaces it")
            asyncio.get_running_loop().call_later(DEAD_REPLICA_EXIT_S, os._exit, 1)
        raise Overloaded(
            "this replica's engine failed; retry the request", type="service_unavailable"
        )

    def stats(self) -> dict:
        s = self.engine.stats()
        return {**self.counters, **{k: v for k, v in s.items() if k != "waiting_prompt_tokens"}}

    def record_routing_stats(self) -> dict:
        """Polled by Serve for the request routers (and read by the ingress's /metrics)."""
        return {
            **self.counters,
            **self.engine.stats(),
            "replica": serve.get_replica_context().replica_id.unique_id,
        }

    def check_health(self) -> None:
        if self.engine.dead:
            raise RuntimeError("the engine has failed; this replica must be replaced")


def _in_replica() -> bool:
    try:
        serve.get_replica_context()
    except Exception:
        return False
    return True
