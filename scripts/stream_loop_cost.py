"""The event loop's CPU per engine step for a replica's streams (docs/bench/serving.md).

A thread delivers one RequestOutput per stream every --step-ms, as AsyncEngine's step thread
does (one call_soon_threadsafe per step), and each stream is read through LLMServer._deltas as
a replica reads it; the loop thread's CPU time is divided by the steps. With --coalescer FILE
(the serving/coalesce.py of a commit before engine/output_stream.py, from `git show
cd2f29d:qwen35_ray/serving/coalesce.py`) the streams go the old way: every step's output
queued, then merged per interval by that module's coalesced().

    python scripts/stream_loop_cost.py [--coalescer /tmp/old_coalesce.py]
"""

import argparse
import asyncio
import importlib.util
import threading
import time

from qwen35_ray.engine.output_stream import OutputStream
from qwen35_ray.engine.outputs import CompletionOutput, RequestOutput
from qwen35_ray.serving.llm_server import LLMServer, timed


class NoTimer:
    def step(self, num_tokens, queue_time):
        pass

    def finish(self, reason):
        pass


async def run(streams: int, steps: int, step_s: float, interval_s: float, coalesced=None):
    loop = asyncio.get_running_loop()
    server = LLMServer.__new__(LLMServer)  # only _deltas, which needs no engine
    if coalesced is None:
        boxes = [OutputStream(interval_s, timed(NoTimer())) for _ in range(streams)]
        put = [box.put for box in boxes]
        get = [box.get for box in boxes]
    else:
        queues = [asyncio.Queue() for _ in range(streams)]
        put = [q.put_nowait for q in queues]
        get = [q.get for q in queues]

    async def outputs(i):
        while True:
            out = await get[i]()
            yield out
            if out.finished:
                return

    async def consume(i):
        deltas = server._deltas(outputs(i), NoTimer())
        if coalesced is not None:
            deltas = coalesced(deltas, interval_s)
        return sum([1 async for _ in deltas])

    readers = [asyncio.create_task(consume(i)) for i in range(streams)]

    def step_thread():
        for s in range(steps):
            n, finish = s + 1, "length" if s == steps - 1 else None
            outs = [
                RequestOutput(
                    f"r{i}", None, [1] * 256, [CompletionOutput(0, "ab" * n, [5] * n, None, finish)]
                )
                for i in range(streams)
            ]
            loop.call_soon_threadsafe(lambda outs=outs: [p(o) for p, o in zip(put, outs)])
            time.sleep(step_s)

    start = time.thread_time()
    thread = threading.Thread(target=step_thread)
    thread.start()
    items = await asyncio.gather(*readers)
    cpu = time.thread_time() - start
    thread.join()
    return cpu / steps, sum(items)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--step-ms", type=float, default=7.0)
    p.add_argument("--interval", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--coalescer", help="an old serving/coalesce.py: measure that path")
    a = p.parse_args()
    coalesced = None
    if a.coalescer:
        spec = importlib.util.spec_from_file_location("old_coalesce", a.coalescer)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        coalesced = module.coalesced
    for r in range(a.repeats):
        for interval in a.interval:
            per_step, items = asyncio.run(
                run(a.streams, a.steps, a.step_ms / 1e3, interval, coalesced)
            )
            print(
                f"repeat {r}: interval {interval} s: loop CPU {per_step * 1e3:.3f} ms per step "
                f"({a.streams} streams, {items} stream items)",
                flush=True,
            )


if __name__ == "__main__":
    main()
