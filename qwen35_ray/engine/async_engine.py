"""AsyncEngine: the LLMEngine behind asyncio. A background loop runs steps in a worker thread;
requests are added, streamed and aborted from coroutines, between steps."""

import asyncio
import threading
from collections.abc import AsyncIterator

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.outputs import RequestOutput
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        # ("add", args) / ("import", RequestState) / ("abort", id), applied between steps;
        # an import waits here until a state slot and blocks are free
        self._pending: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.errored: BaseException | None = None

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        prefill_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changes it; the last is finished
        (or, with prefill_only, carries the exported RequestState). Leaving the iteration
        early (client gone) aborts the request."""
        self.engine.check_request(prompt_token_ids, params)
        if prefill_only and params.n != 1:
            raise ValueError("a prefill-only request must have n=1")
        args = (request_id, list(prompt_token_ids), params, prompt, prefill_only)
        async for out in self._stream(request_id, ("add", args)):
            yield out

    async def import_state(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """Continue a request another engine prefilled (see LLMEngine.import_request) and
        yield its outputs like generate(). It waits for a free state slot and KV blocks."""
        self.engine.check_import(state)
        async for out in self._stream(state.request_id, ("import", state)):
            yield out

    async def _stream(self, request_id: str, command: tuple) -> AsyncIterator[RequestOutput]:
        if self.errored is not None:
            raise RuntimeError("the engine loop has failed") from self.errored
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        with self._lock:
            self._pending.append(command)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, ValueError):  # import_request refused the state
                    finished = True
                    raise item
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed while running this request") from item
                finished = item.finished or item.request_state is not None
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))
        self._wake.set()

    def _apply_pending(self) -> list[tuple[str, ValueError]]:
        """Apply queued commands; return (request id, error) for imports this engine refuses."""
        with self._lock:
            pending, self._pending = self._pending, []
        waiting, refused = [], []
        for kind, arg in pending:
            if kind == "add":
                self.engine.add_request(*arg)
            elif kind == "import":
                if waiting or not self.engine.can_import(arg):
                    waiting.append((kind, arg))  # in arrival order, once there is room
                    continue
                try:
                    self.engine.import_request(arg)
                except ValueError as e:
                    refused.append((arg.request_id, e))
            else:
                waiting = [(k, a) for k, a in waiting if a.request_id != arg]
                self.engine.abort(arg)
        if waiting:
            with self._lock:
                self._pending = waiting + self._pending
        return refused

    async def _run(self) -> None:
        try:
            while True:
                for request_id, error in await asyncio.to_thread(self._apply_pending):
                    if (queue := self._streams.get(request_id)) is not None:
                        queue.put_nowait(error)
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    if not self._pending:
                        await self._wake.wait()
                    continue
                for out in await asyncio.to_thread(self.engine.step):
                    queue = self._streams.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
        except Exception as e:  # a fault in the engine: fail every open stream, not hang them
            self.errored = e
            for queue in self._streams.values():
                queue.put_nowait(e)
            raise
