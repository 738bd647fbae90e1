"""LLMServer: one replica holding an AsyncEngine, streaming per-step deltas to the ingress.

Admission: a replica queues at most `max_waiting_requests` prompts and
`max_waiting_prompt_tokens` prompt tokens beyond what runs; more is refused at once with a 503
and Retry-After, so a burst gets fast answers instead of waiting in an unbounded queue.

Failure: a request's own failure ends that request (400 for what it caused, 500 for ours, with
its request id); the engine goes on. If the model itself fails, the engine is dead: open and
later requests get a 503, check_health fails, and the replica process exits so that Serve
stops routing to it and replaces it at once (Serve's health check would take three periods).

Migration and drain: generate(..., resume=...) continues a stream another replica lost, from
the tokens the client has (streams.Migration). A replica Serve stops gets no new requests and
finishes its streams within the pool's graceful_shutdown_timeout_s; Serve then kills it, and
the ingress migrates what still ran.

Expert parallelism: with `expert_parallel_size` N > 1 the replica's engine steps N rank actors
placed in bundles 1..N of the replica's own placement group (AppConfig.serve_options). A rank
that dies fails the step in flight (its requests get the 503 above) or, when idle, the next
health check; either way the replica exits, and Serve removes its placement group, ranks
included, and starts a whole new group.
"""

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator

import ray
import torch
from ray import serve

from qwen35_ray.distributed.build import build_engine
from qwen35_ray.distributed.config import EPConfig
from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.errors import EngineDead, RequestError, RequestFailed
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.serving.autoscaling_signals import AutoscalingSignals
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.errors import EngineLost, OpenAIError, Overloaded, errors_as_items
from qwen35_ray.serving.metrics import install, replica_names
from qwen35_ray.serving.metrics_engine import EngineMetrics, request_reason
from qwen35_ray.serving.metrics_ep import ExpertMetrics

log = logging.getLogger("qwen35_ray.serving")
# Serve writes this logger's INFO lines to the replica's log; others' stop at WARNING there
serve_log = logging.getLogger("ray.serve")

# seconds a replica whose engine died keeps answering (its open streams get their 503) before
# it exits
DEAD_REPLICA_EXIT_S = 1.0
# a health check waits this long for every rank of an EP group to answer (ranks answer from a
# thread of their own, so a long step does not delay them; see distributed/rank_worker.py)
RANK_CHECK_TIMEOUT_S = 2.0


class LLMServer(AutoscalingSignals):
    """Deployed by the builder; methods are called through a Serve handle."""

    def __init__(self, config: dict, pool: str = "llm_server"):
        """pool: the AppConfig key of this replica's deployment, whose engine settings it runs."""
        cfg = AppConfig.model_validate(config)
        self.config, self.pool = cfg, pool
        e = cfg.engine_for(pool)
        threads = getattr(cfg, pool).torch_threads
        if threads is not None:
            # before the engine exists: a compiled decode step fixes its threads when traced
            torch.set_num_threads(threads)
        ep = EPConfig(
            e.expert_parallel_size, e.rank_num_cpus, e.rank_num_gpus, e.placement_strategy
        )
        engine = build_engine(
            cfg.model,
            cfg.dtype,
            cfg.device,
            ep,
            # Serve created it for this replica: bundle 0 holds the replica, 1..N the ranks
            placement_group=ray.util.get_current_placement_group() if ep.size > 1 else None,
            **e.engine_kwargs,
        )
        self.engine = AsyncEngine(engine)
        self.expert_metrics = ExpertMetrics(engine)
        self.max_waiting, self.max_waiting_tokens = cfg.waiting_limits(pool)
        self.counters = {
            "requests_total": 0,
            "requests_aborted_total": 0,
            "requests_rejected_total": 0,
            "requests_failed_total": 0,
            "requests_resumed_total": 0,
        }
        self._exiting = False
        pool_name, replica = replica_names(type(self).__name__)
        self.metrics = EngineMetrics(
            pool_name, replica, cfg.model_name, engine.max_model_len, self.stats
        )
        install(self.metrics)
        # why a health check found the EP group broken (a rank gone or not answering)
        self._group_lost: BaseException | None = None
        serve_log.info(
            "%s ready: %s (%s), expert_parallel_size=%d%s",
            type(self).__name__,
            cfg.model,
            engine.dtype,
            ep.size,
            self.expert_metrics.describe(),
        )

    def _admit(self, num_prompt_tokens: int) -> None:
        """Refuse work (503) when this replica's queue is full or its engine has died.
        A request is always admitted to an empty queue, however long its prompt."""
        if self.engine.dead or self._group_lost is not None:
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

    async def _params(
        self, prompt_token_ids: list[int], params: dict, resume: dict | None = None
    ) -> SamplingParams:
        """Validate (400) off the event loop, since a grammar may take a while to compile,
        then admit (503). Nothing awaits between admission and the caller queueing the
        request, so a burst cannot pass the check all at once. resume: see generate()."""
        try:
            sp = SamplingParams(**params)
        except (TypeError, ValueError) as e:
            raise OpenAIError(str(e), status=400) from e
        check = asyncio.to_thread(
            self.engine.engine.check_request, prompt_token_ids, sp, **_resume_args(resume)
        )
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
        # a resumed request prefills its tokens so far with the prompt
        resumed = len(resume["token_ids"]) if resume else 0
        self._admit(len(prompt_token_ids) + resumed)
        return sp

    @errors_as_items
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: dict,
        request_id: str | None = None,
        resume: dict | None = None,
        images: list | None = None,
    ) -> AsyncIterator[dict]:
        """Yield {"outputs": [{index, text, token_ids, logprobs, finish_reason}], ...} deltas:
        the text and tokens each output gained in one engine step. An error is the last item,
        {"error": ..., "headers": ...} (errors.raise_error_item raises it again).

        resume (n=1): {"token_ids", "logprobs", "text_chars"}, what the client already has of
        output 0 from a replica that was lost (streams.Migration); the request continues after
        it, and the deltas start from there.

        images: RGB PIL images, one per image of the prompt in order (its <|image_pad|> runs);
        a replica whose engine has no vision tower refuses them (400)."""
        sp = await self._params(prompt_token_ids, params, resume)
        request_id = request_id or uuid.uuid4().hex
        self.counters["requests_total"] += 1
        kwargs = _resume_args(resume)
        seen = None
        if kwargs:
            self.counters["requests_resumed_total"] += 1
            seen = {0: (len(kwargs["resume_token_ids"]), resume["text_chars"])}
        timer = self.metrics.request(
            len(prompt_token_ids),
            "resumed" if kwargs else "new",
            len(kwargs.get("resume_token_ids", ())),
        )
        outputs = self.engine.generate(
            request_id,
            prompt_token_ids,
            sp,
            images=images,
            interval_s=self.config.stream_interval_s,
            on_output=timed(timer, seen),
            **kwargs,
        )
        async for delta in self._deltas(outputs, timer, seen):
            yield delta

    async def _deltas(self, outputs, timer, seen: dict[int, tuple[int, int]] | None = None):
        """RequestOutputs -> what each output gained since the last one (or since `seen`:
        index -> (tokens, characters) the client already has). Engine failures become the
        client's error: 400 for what the request caused, 500 for ours, 503 if the engine died.
        timer (metrics_engine.RequestTimer) records how the request ended; its steps are
        recorded at each engine step (timed())."""
        seen = dict(seen or {})
        finished, reason = False, "error"
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
                if finished:
                    # a prefill handed off (request_state) ends on the decode replica
                    reason = request_reason([o.finish_reason for o in out.outputs])
                    reason = reason if out.finished else None
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
                reason = "abort"
            timer.finish(reason)

    def _engine_died(self):
        """The replica cannot serve anymore: say so (503), and leave so Serve replaces it."""
        self._exit_soon()
        raise EngineLost("this replica's engine failed; retry the request")

    def _exit_soon(self) -> None:
        if not self._exiting and _in_replica():
            self._exiting = True
            log.error("the engine failed; this replica exits so that Serve replaces it")
            # a timer thread: the health check runs in a worker thread, with no event loop
            timer = threading.Timer(DEAD_REPLICA_EXIT_S, os._exit, (1,))
            timer.daemon = True
            timer.start()

    def stats(self) -> dict:
        """The engine's stats and this replica's counters, with its expert-parallel samples
        under "labelled": read by its metrics at each scrape (ExpertMetrics.cached: how
        fresh)."""
        s = self.engine.stats()
        return {
            **self.counters,
            **{k: v for k, v in s.items() if k != "waiting_prompt_tokens"},
            **self.expert_metrics.cached(),
        }

    async def record_routing_stats(self) -> dict:
        """Polled by Serve's controller every second for the request routers: small, as it
        goes to every router (/metrics reads the replica's registry: serving/metrics.py)."""
        return self.engine.stats()

    async def wait_compiled(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for the engine's compiled decode step (compile_decode auto
        compiles it in the background while the first steps run eagerly), so a benchmark
        measures the steady state. True once decode steps run compiled; False without a
        compiled step (compile_decode False, expert-parallel, a failed compile) or on timeout."""
        wait = getattr(self.engine.engine.executor, "wait_compiled", None)
        return wait is not None and await asyncio.to_thread(wait, timeout_s)

    def check_health(self) -> None:
        """Fails when the engine died or, for an EP group, when a rank is gone or does not
        answer in RANK_CHECK_TIMEOUT_S: the replica then exits, so Serve replaces the whole
        group at once. Serve runs sync methods in a worker thread (RAY_SERVE_RUN_SYNC_IN_
        THREADPOOL, on by default), so waiting for the ranks blocks no event loop."""
        if self.engine.dead or self._group_lost is not None:
            raise RuntimeError("the engine has failed; this replica must be replaced")
        check = getattr(self.engine.engine, "check_alive", None)
        if check is None:
            return
        try:
            check(RANK_CHECK_TIMEOUT_S)
        except Exception as e:
            self._group_lost = e
            log.error("the expert-parallel group lost a rank: %s", e)
            self._exit_soon()
            raise RuntimeError(f"a rank of this replica's expert-parallel group failed: {e}") from e

    def __del__(self):
        # Serve calls this when it stops the replica: the ranks' collectives end with it
        engine = getattr(self, "engine", None)
        shutdown = getattr(getattr(engine, "engine", None), "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as e:
                log.warning("engine shutdown failed: %s", e)


def timed(timer, seen: dict[int, tuple[int, int]] | None = None):
    """An AsyncEngine on_output hook: every engine step's output of a request to its timer
    (metrics_engine.RequestTimer: time to first token, inter-token latency per step), whatever
    the stream's interval. seen: what the client already had (see LLMServer._deltas)."""
    counted = sum(n for n, _ in (seen or {}).values())

    def on_output(out) -> None:
        nonlocal counted
        total = sum(len(o.token_ids) for o in out.outputs)
        timer.step(total - counted, out.queue_time)
        counted = total

    return on_output


def _resume_args(resume: dict | None) -> dict:
    """The engine's keyword arguments for a resumed request; none for a new one (or a resume
    before any token, which is one)."""
    if not resume or not resume["token_ids"]:
        return {}
    return {"resume_token_ids": resume["token_ids"], "resume_logprobs": resume["logprobs"]}


def _in_replica() -> bool:
    try:
        serve.get_replica_context()
    except Exception:
        return False
    return True
