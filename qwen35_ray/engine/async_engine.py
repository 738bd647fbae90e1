"""AsyncEngine: the LLMEngine behind asyncio. A step thread of its own runs the engine's steps
back to back; requests are added, streamed and aborted from coroutines, and the thread applies
them between steps. Each step's outputs reach the event loop in one call_soon_threadsafe, so the
next step never waits for a busy event loop to turn round (on 2 shared cores the loop of a Serve
replica is often slow to).

One request's failure ends only its own stream (errors.RequestError or RequestFailed); a failure
of the model itself kills the engine, and every open and later stream raises EngineDead.
"""

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from qwen35_ray.engine.errors import EngineDead, RequestError, request_failure
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.output_stream import OutputStream
from qwen35_ray.engine.outputs import RequestOutput
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, OutputStream] = {}
        # ("add", args) / ("import", RequestState) / ("abort", id), applied between steps;
        # an import waits here until a state slot and blocks are free
        self._pending: list[tuple] = []
        # commands taken from _pending and not yet in the stats snapshot
        self._applying: list[tuple] = []
        self._lock = threading.Lock()
        # set when a command is queued; the idle step thread waits on it
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # the event loop the streams live in (the latest caller's)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # the model's failure that killed the engine
        self.errored: BaseException | None = None
        # replaced whole by the step thread, so a reader never sees a half-updated one
        self._stats = self._snapshot()

    @property
    def dead(self) -> bool:
        return self.errored is not None

    def stats(self) -> dict:
        """A consistent snapshot of the queues, the cache and the counters (LLMEngine.load_stats:
        tokens, and steps_total, step_seconds_total, decode_steps_total,
        decode_step_seconds_total of the busy step thread), safe to call while a step runs.
        `waiting`, `waiting_prompt_tokens` and `pending_prompt_tokens` (every token still to
        prefill) include adds and imports not yet applied."""
        with self._lock:
            stats = dict(self._stats)
            queued = [c for c in self._pending + self._applying if c[0] != "abort"]
        for kind, arg in queued:
            n, prompt = (arg[2].n, arg[1]) if kind == "add" else (1, arg.prompt_token_ids)
            stats["waiting"] += n
            stats["waiting_prompt_tokens"] += n * len(prompt)
            stats["pending_prompt_tokens"] += n * len(prompt)
        return stats

    def _snapshot(self) -> dict:
        """Read in the step thread (or before it starts): the scheduler's queues change there."""
        return self.engine.load_stats()

    def _ensure_thread(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the step thread after its current step (open streams get nothing more)."""
        self._closed = True
        self._wake.set()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        prefill_only: bool = False,
        resume_token_ids: list[int] | None = None,
        resume_logprobs: list | None = None,
        images: list | None = None,
        interval_s: float = 0.0,
        on_output=None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changes it; the last is finished
        (or, with prefill_only, carries the exported RequestState). Leaving the iteration
        early (client gone) aborts the request. resume_token_ids, resume_logprobs: continue
        from output tokens it already has (LLMEngine.add_request); its outputs hold them.
        images: PIL images, one per <|image_pad|> of the prompt, prepared (resized, cut into
        patches) in a worker thread, so a large image does not hold the step thread.
        interval_s > 0: after the first token, only the newest output at most that often
        (outputs are cumulative), the end at once; on_output(out) sees every step's output but
        an error's (engine/output_stream.py).
        Raises RequestError, RequestFailed or EngineDead (engine/errors.py)."""
        prepare = getattr(self.engine, "prepare_images", None)  # an EP engine refuses images
        if images and prepare is not None:
            prompt_token_ids, images = await asyncio.to_thread(prepare, prompt_token_ids, images)
        self.engine.check_request(prompt_token_ids, params, resume_token_ids, resume_logprobs)
        if prefill_only and params.n != 1:
            raise RequestError("a prefill-only request must have n=1")
        resume = None if resume_token_ids is None else list(resume_token_ids)
        args = (
            request_id,
            list(prompt_token_ids),
            params,
            prompt,
            prefill_only,
            resume,
            resume_logprobs,
            images,
        )
        stream = OutputStream(interval_s, on_output)
        async for out in self._stream(request_id, ("add", args), stream):
            yield out

    async def import_state(
        self, state: RequestState, interval_s: float = 0.0, on_output=None
    ) -> AsyncIterator[RequestOutput]:
        """Continue a request another engine prefilled (see LLMEngine.import_request) and
        yield its outputs like generate(). It waits for a free state slot and KV blocks."""
        try:
            self.engine.check_import(state)
        except ValueError as e:
            raise request_failure(state.request_id, e, "being imported") from e
        stream = OutputStream(interval_s, on_output)
        async for out in self._stream(state.request_id, ("import", state), stream):
            yield out

    async def _stream(
        self, request_id: str, command: tuple, stream: OutputStream
    ) -> AsyncIterator[RequestOutput]:
        if self.errored is not None:
            raise self._dead_error()
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = stream
        with self._lock:
            self._pending.append(command)
        self._ensure_thread()
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished or item.request_state is not None
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def _dead_error(self) -> EngineDead:
        # a new exception per stream: raising one object in many coroutines tangles tracebacks
        error = EngineDead("the engine is dead: its model failed; this replica takes no requests")
        error.__cause__ = self.errored
        return error

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))
        self._wake.set()

    def _apply_pending(self) -> list[tuple[str, Exception]]:
        """Apply queued commands (in the step thread); return (request id, error) for the adds
        and imports that failed, each failing alone."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._applying = pending
        waiting, failed = [], []
        for kind, arg in pending:
            if kind == "abort":
                waiting = [(k, a) for k, a in waiting if a.request_id != arg]
                self.engine.abort(arg)
                continue
            request_id = arg[0] if kind == "add" else arg.request_id
            when = "being added" if kind == "add" else "being imported"
            try:
                if kind == "add":
                    self.engine.add_request(*arg)
                elif waiting or not self.engine.can_import(arg):
                    waiting.append((kind, arg))  # in arrival order, once there is room
                else:
                    self.engine.import_request(arg)
            except Exception as e:
                failed.append((request_id, request_failure(request_id, e, when)))
        stats = self._snapshot()
        with self._lock:
            self._pending = waiting + self._pending
            self._applying = []
            self._stats = stats
        return failed

    def _step(self) -> list[RequestOutput]:
        outs = self.engine.step()
        stats = self._snapshot()
        with self._lock:
            self._stats = stats
        return outs

    def _post(self, fn, arg) -> None:
        """Run fn(arg) in the event loop (from the step thread)."""
        loop = self._loop
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop is closed: its streams are gone with it
            pass

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _deliver_errors(self, failed: list[tuple[str, Exception]]) -> None:
        for request_id, error in failed:
            if (stream := self._streams.get(request_id)) is not None:
                stream.fail(error)

    def _fail_all(self, _) -> None:
        for stream in self._streams.values():
            stream.fail(self._dead_error())

    def _run(self) -> None:
        """The step thread: apply queued commands, step while anything is unfinished, sleep
        until a command arrives."""
        try:
            while not self._closed:
                if failed := self._apply_pending():
                    self._post(self._deliver_errors, failed)
                if not self.engine.has_unfinished():
                    with self._lock:
                        if self._pending:
                            continue
                        self._wake.clear()
                    self._wake.wait()
                    continue
                self._post(self._deliver, self._step())
        except Exception as e:  # the model failed (EngineDead) or the engine's own state did
            self.errored = e
            log.error("the engine is dead; failing %d open streams", len(self._streams), exc_info=e)
            self._post(self._fail_all, None)
