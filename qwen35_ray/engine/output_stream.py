"""OutputStream: one request's outputs, from the step thread's deliveries to the coroutine that
streams them, with an optional interval (vLLM's --stream-interval, in seconds).

A request's outputs are cumulative (each holds all its tokens and text so far), so a reader
that is sent the newest output loses nothing by skipping those before it. With interval_s > 0
the reader is woken for the first output, then at most once per interval_s, and at once for
the end (a finish, a hand-off's state, an error); the outputs of the steps between are
replaced, not queued. A Serve replica stepping every 7 ms for 16 streams then wakes its event
loop about 20 times a second per stream instead of 140, and sends as many stream items: each
wake-up and each item costs CPU the engine's step thread shares (docs/bench/serving.md).

interval_s 0: every output, in order. on_output(out) runs at every step's delivery, in the
event loop, whatever the interval, for every output but one that carries an error (the stream
ends with that error instead): per-step metrics (inter-token latency) stay per step.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from qwen35_ray.engine.outputs import RequestOutput

log = logging.getLogger(__name__)


class OutputStream:
    def __init__(self, interval_s: float = 0.0, on_output: Callable | None = None):
        self.interval_s = interval_s
        self.on_output = on_output
        # outputs not yet read: at most the newest one when interval_s > 0
        self._outputs: deque[RequestOutput] = deque()
        # what ended the stream (a RequestOutput's error, or one put by fail()); read after
        # the output held before it
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        # while the reader waits out its interval it is woken only by the end
        self._ending_only = False
        # loop time a token last went to the reader (None: none yet, the first goes at once)
        self._last_sent: float | None = None
        self._tokens_read = 0

    def put(self, out: RequestOutput) -> None:
        """In the event loop, at every step that changed the request."""
        if out.error is not None:
            self._error = out.error
        else:
            if self.interval_s > 0:
                self._outputs.clear()
            self._outputs.append(out)
            if self.on_output is not None:
                try:
                    self.on_output(out)
                except Exception:  # a metrics hook must not cost the other streams their output
                    log.exception("a stream's on_output hook failed")
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the stream with error (the request failed before it ran, or the engine died)."""
        self._error = error
        self._wake()

    def _ending(self) -> bool:
        if self._error is not None:
            return True
        out = self._outputs[-1] if self._outputs else None
        return out is not None and (out.finished or out.request_state is not None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and (not self._ending_only or self._ending()):
            w.set_result(None)

    async def _wait(self, ending_only: bool, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter, self._ending_only = loop.create_future(), ending_only
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _resolve, self._waiter)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def get(self) -> RequestOutput | BaseException:
        """The next output to send (the newest, with an interval), or the error that ended the
        stream once the outputs before it are read."""
        loop = asyncio.get_running_loop()
        if self.interval_s > 0 and self._last_sent is not None and not self._ending():
            wait = self._last_sent + self.interval_s - loop.time()
            if wait > 0:
                await self._wait(ending_only=True, timeout=wait)
        while not self._outputs and self._error is None:
            await self._wait(ending_only=False)
        if not self._outputs:
            return self._error
        out = self._outputs.popleft()
        tokens = sum(len(o.token_ids) for o in out.outputs)
        if tokens > self._tokens_read:
            self._tokens_read, self._last_sent = tokens, loop.time()
        return out


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
