"""AsyncEngine: the LLMEngine behind asyncio. A background loop runs steps in a worker thread;
requests are added, streamed and aborted from coroutines, between steps."""

import asyncio
import threading
from collections.abc import AsyncIterator

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.outputs import RequestOutput
from qwen35_ray.engine.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple] = []  # ("add", args) / ("abort", id), applied between steps
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
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that changes it; the last is finished.
        Leaving the iteration early (client gone) aborts the request."""
        if self.errored is not None:
            raise RuntimeError("the engine loop has failed") from self.errored
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.check_request(prompt_token_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        with self._lock:
            self._pending.append(("add", (request_id, list(prompt_token_ids), params, prompt)))
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine failed while running this request") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))
        self._wake.set()

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for kind, arg in pending:
            if kind == "add":
                self.engine.add_request(*arg)
            else:
                self.engine.abort(arg)

    async def _run(self) -> None:
        try:
            while True:
                await asyncio.to_thread(self._apply_pending)
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
