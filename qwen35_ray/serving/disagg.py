"""Prefill/decode disaggregation: two pools of replicas and the orchestration between them.

A request's prompt is prefilled on a PrefillServer replica, which samples the first token and
exports the request (its GDN states and its prompt's K/V) as a RequestState. The state moves to
a DecodeServer replica (see transfer.py) which imports it and streams the rest. The ingress
holds a Disaggregator that drives both and hands the client one stream of deltas, shaped like
the collocated LLMServer's.

Conditional disaggregation: a prompt shorter than `min_prefill_tokens`, a request with n > 1,
or any prompt while this ingress already waits on `max_prefill_queue` prefills, is prefilled
on the decode replica itself (the collocated path), where moving it would cost more than it
saves.

Migration: a stream (n=1) whose decode replica is lost after the client has tokens resumes on
another decode replica, which prefills the prompt plus the tokens sent itself
(DecodeServer.generate with resume): the request's state on the lost replica is gone with it.

Admission: a decode replica admits an import (or answers 503 when its queue is full) before it
fetches the state, and the ingress sends the client the first token only once it has, so an
overloaded decode pool is a plain HTTP 503 rather than an error after the first token.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError

from qwen35_ray.serving import transfer
from qwen35_ray.serving.config import AppConfig, DisaggregationConfig
from qwen35_ray.serving.errors import OpenAIError, Overloaded, errors_as_items, raise_error_item
from qwen35_ray.serving.llm_server import LLMServer, timed
from qwen35_ray.serving.serve_mode import by_reference, heavy
from qwen35_ray.serving.streams import REPLICA_LOST, Migration, guarded

log = logging.getLogger("qwen35_ray.serving")


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


class PrefillServer(LLMServer):
    """Prefill pool: computes prompts, samples each first token, publishes the state."""

    def __init__(self, config: dict, pool: str = "prefill_server"):
        super().__init__(config, pool)
        self.backend = AppConfig.model_validate(config).disaggregation.transfer
        self.counters |= {"transfer_bytes_total": 0, "transfer_send_seconds_total": 0.0}

    async def prefill(
        self, prompt_token_ids: list[int], params: dict, request_id: str, images=None
    ) -> dict:
        """Returns {"step": the first delta, "handoff": where the state is (None when the
        request already finished), "replica": this replica}, or an error item (see
        errors.OpenAIError.as_item). images: see LLMServer.generate; the state handed off
        carries what decoding needs of them (the rope delta), not the images."""
        try:
            return await self._run_prefill(prompt_token_ids, params, request_id, images)
        except OpenAIError as e:
            return e.as_item()

    async def _run_prefill(self, prompt_token_ids, params: dict, request_id: str, images):
        sp = await self._params(prompt_token_ids, params)
        self.counters["requests_total"] += 1
        last = None
        timer = self.metrics.request(len(prompt_token_ids))

        async def outputs():
            nonlocal last
            async for out in self.engine.generate(
                request_id,
                prompt_token_ids,
                sp,
                prefill_only=True,
                images=images,
                on_output=timed(timer),
            ):
                last = out
                yield out

        steps = [step async for step in self._deltas(outputs(), timer)]
        step = {"outputs": [d for s in steps for d in s["outputs"]], "num_cached_tokens": 0}
        step["num_cached_tokens"] = last.num_cached_tokens
        handoff = None
        if last.request_state is not None:
            handoff = transfer.send(last.request_state, self.backend)
            o = last.outputs[0]
            handoff["seen"] = {0: (len(o.token_ids), len(o.text))}
            # the decode replica admits the import on this before it fetches the state
            handoff["num_prompt_tokens"] = len(prompt_token_ids)
            self.counters["transfer_bytes_total"] += handoff["nbytes"]
            self.counters["transfer_send_seconds_total"] += handoff["send_s"]
        return {"step": step, "handoff": handoff, "replica": _replica_id()}


class DecodeServer(LLMServer):
    """Decode pool: continues imported requests; also serves short prompts whole."""

    def __init__(self, config: dict, pool: str = "decode_server"):
        super().__init__(config, pool)
        self.counters |= {"imports_total": 0, "transfer_receive_seconds_total": 0.0}

    @errors_as_items
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: dict,
        request_id: str | None = None,
        resume: dict | None = None,
        images: list | None = None,
    ) -> AsyncIterator[dict]:
        """The whole request here (a short prompt, or a stream migrated off a lost decode
        replica, prefilled again here from its prompt and `resume`: see LLMServer.generate);
        the first item names this replica."""
        first = True
        async for step in super().generate(prompt_token_ids, params, request_id, resume, images):
            if first:
                step["replica"], first = _replica_id(), False
            yield step

    @errors_as_items
    async def decode(self, handoff: dict) -> AsyncIterator[dict]:
        """Import the handed-off state and yield the deltas after the ones already sent.
        The first item, {"admitted": True, "replica"}, comes at once: this replica took the
        import (else a 503 before the state is fetched). The next also says how long the
        fetch took."""
        self._admit(handoff["num_prompt_tokens"])
        yield {"admitted": True, "replica": _replica_id()}
        try:
            state, seconds = await transfer.receive(handoff)
        except ValueError as e:
            raise OpenAIError(f"the handed-off request state is unusable: {e}", 400) from e
        self.counters["imports_total"] += 1
        self.counters["transfer_receive_seconds_total"] += seconds
        # again: other imports may have been admitted during the fetch; from here nothing
        # awaits until the import is queued, so a burst cannot pass the bound together
        self._admit(len(state.prompt_token_ids))
        first = True
        try:
            timer = self.metrics.request(
                len(state.prompt_token_ids), "imported", len(state.output_token_ids)
            )
            imported = self.engine.import_state(
                state, self.config.stream_interval_s, timed(timer, handoff["seen"])
            )
            async for step in self._deltas(imported, timer, handoff["seen"]):
                if first:
                    step["receive_s"], first = seconds, False
                yield step
        # the engine refused the state (RequestState.check): another model, counts, vocabulary
        except ValueError as e:
            raise OpenAIError(str(e), status=400) from e


class Disaggregator:
    """In the ingress: routes each request through prefill then decode, or decode alone."""

    def __init__(self, prefill, decode, cfg: DisaggregationConfig, migration_limit: int = 0):
        self.prefill, self.decode, self.cfg = prefill, decode, cfg
        self.migration_limit = migration_limit
        self.prefills_in_flight = 0
        self.counters = Counter({"migrations_total": 0, "migration_failures_total": 0})
        self.decode_replicas = Counter()  # requests each decode replica served

    def disaggregates(self, prompt_len: int, params: dict) -> bool:
        return (
            prompt_len >= self.cfg.min_prefill_tokens
            and params.get("n", 1) == 1
            and self.prefills_in_flight < self.cfg.max_prefill_queue
        )

    def _migration(self, prompt_ids: list[int], params: dict, images, first: dict | None = None):
        """A stream of n=1 that loses its decode replica resumes on another, prefilled there
        from the prompt and the tokens sent (DecodeServer.generate with resume)."""
        if params.get("n", 1) != 1:
            return None
        decode = by_reference(self.decode, heavy(prompt_ids, params, images)).options(stream=True)
        resume = lambda r: decode.generate.remote(prompt_ids, params, None, r, images)  # noqa: E731
        return Migration(resume, self.migration_limit, first)

    async def generate(
        self, prompt_ids: list[int], params: dict, images: list | None = None
    ) -> AsyncIterator[dict]:
        request_id = uuid.uuid4().hex
        if not self.disaggregates(len(prompt_ids), params):
            self.counters["requests_local_prefill_total"] += 1
            decode = by_reference(self.decode, heavy(prompt_ids, params, images)).options(
                stream=True
            )
            stream = lambda: decode.generate.remote(  # noqa: E731
                prompt_ids, params, request_id, None, images
            )
            migration = self._migration(prompt_ids, params, images)
            async for step in self._on_decode(stream, migration):
                yield step
            return
        self.counters["requests_disaggregated_total"] += 1
        self.prefills_in_flight += 1
        t0 = time.perf_counter()
        try:
            first = await self._prefill(prompt_ids, params, request_id, images)
        finally:
            self.prefills_in_flight -= 1
        self.counters["prefill_seconds_total"] += time.perf_counter() - t0
        handoff = first["handoff"]
        if handoff is None:  # finished at its first token
            yield first["step"]
            return
        self.counters["transfers_total"] += 1
        self.counters["transfer_bytes_total"] += handoff["nbytes"]
        self.counters["transfer_wire_bytes_total"] += handoff["wire_bytes"]
        self.counters["transfer_seconds_total"] += handoff["send_s"]
        # the handoff holds ObjectRefs: Ray's transport, never gRPC (serve_mode.by_reference)
        decode = by_reference(self.decode).options(stream=True)
        stream = lambda: decode.decode.remote(handoff)  # noqa: E731
        # the first token goes out before the decode stream's own output, so a migration
        # resumes after it
        migration = self._migration(prompt_ids, params, images, first["step"])
        decoded = self._on_decode(stream, migration)
        # the first token waits for a decode replica to admit the import, so that an
        # overloaded decode pool is a clean 503 before any output, not an error mid-stream
        await anext(decoded)
        yield first["step"]
        async for step in decoded:
            if "admitted" in step:  # from a retry on another replica
                continue
            if "receive_s" in step:
                self.counters["transfer_seconds_total"] += step.pop("receive_s")
            yield step

    async def _prefill(self, prompt_ids, params: dict, request_id: str, images) -> dict:
        for attempt in range(1 + self.cfg.retries):
            try:
                # its answer holds the handoff's ObjectRefs
                prefill = by_reference(self.prefill)
                first = await prefill.prefill.remote(prompt_ids, params, request_id, images)
                raise_error_item(first)
                return first
            except BackPressureError:
                raise Overloaded("the prefill pool is overloaded; retry later") from None
            except REPLICA_LOST:
                self.counters["prefill_replica_failures_total"] += 1
                if attempt == self.cfg.retries:
                    raise OpenAIError(
                        "the replica prefilling this request failed; retry the request",
                        status=503,
                        type="service_unavailable",
                    ) from None
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _on_decode(self, make_stream, migration: Migration | None = None):
        """Run a decode stream (see streams.guarded: a replica lost before any output is
        retried elsewhere; after output the stream migrates when `migration` is given; then a
        clean 503; a client gone cancels it)."""
        # an import's admission is no output: losing the replica after it is retried
        stream = guarded(
            make_stream,
            self.cfg.retries,
            self.counters,
            prefix="decode_",
            is_output=lambda step: "admitted" not in step,
            role="decoding",
            migration=migration,
        )
        async for step in stream:
            if "replica" in step:
                self.decode_replicas[step.pop("replica")] += 1
            yield step
