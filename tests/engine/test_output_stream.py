"""engine/output_stream.py: a request's outputs sent at most once per interval, the newest
standing for those it replaces, without losing, reordering or delaying what a client must get
at once; every step still seen by on_output."""

import asyncio
import time

from qwen35_ray.engine.errors import RequestFailed
from qwen35_ray.engine.output_stream import OutputStream
from qwen35_ray.engine.outputs import CompletionOutput, RequestOutput


def output(n, finish=None, error=None):
    """The request's cumulative output after n tokens."""
    o = CompletionOutput(0, "".join(f"t{t}" for t in range(n)), list(range(n)), None, finish)
    return RequestOutput("r", None, [1, 2], [o], error=error)


async def read(stream, outputs, gap_s):
    """Deliver outputs gap_s apart (as the step thread's call_soon_threadsafe does) while
    reading the stream; returns (seconds since start, what get() gave) until the end."""
    start = time.monotonic()

    async def deliver():
        for out in outputs:
            await asyncio.sleep(gap_s)
            stream.put(out)

    feeder = asyncio.create_task(deliver())
    got = []
    while True:
        item = await stream.get()
        got.append((time.monotonic() - start, item))
        if isinstance(item, BaseException) or item.finished:
            break
    await feeder
    return got


def test_zero_interval_gives_every_output_in_order():
    outputs = [output(0)] + [output(n) for n in range(1, 6)] + [output(6, "stop")]
    got = asyncio.run(read(OutputStream(0), outputs, 0.001))
    assert [item for _, item in got] == outputs


def test_first_token_at_once_then_the_newest_output_at_most_once_per_interval():
    # 40 tokens 5 ms apart (0.2 s), interval 50 ms
    outputs = [output(0)] + [output(n) for n in range(1, 40)] + [output(40, "length")]
    seen = []
    got = asyncio.run(read(OutputStream(0.05, seen.append), outputs, 0.005))
    items = [item for _, item in got]
    # every step reached on_output, in order, whatever was sent
    assert seen == outputs
    # the output without a token and the first token, each as it came
    assert items[0] is outputs[0] and items[1] is outputs[1] and got[1][0] < 0.03
    # later ones are the newest at each send: cumulative, so nothing is lost
    counts = [len(item.outputs[0].token_ids) for item in items]
    assert counts == sorted(set(counts)) and counts[-1] == 40
    assert items[-1] is outputs[-1]
    times = [t for t, _ in got[1:]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # sends at least an interval apart but the last (the finish, at once)
    assert all(g >= 0.045 for g in gaps[:-1]), gaps
    assert len(items) <= 2 + 0.2 / 0.05 + 2


def test_the_finish_goes_at_once():
    outputs = [output(1), output(2), output(3, "stop")]
    got = asyncio.run(read(OutputStream(1.0), outputs, 0.01))
    # without the rule the finish would wait out the 1 s interval
    assert got[-1][0] < 0.5 and got[-1][1] is outputs[-1]


def test_an_error_comes_after_the_output_held_before_it():
    error = RequestFailed("the request failed")
    outputs = [output(1), output(2), output(3), output(3, "error", error=error)]
    got = asyncio.run(read(OutputStream(1.0), outputs, 0.01))
    items = [item for _, item in got]
    # the first token at once; the two held since come before the error, which is at once
    assert items == [outputs[0], outputs[2], error]
    assert got[-1][0] < 0.5


def test_fail_ends_a_waiting_reader():
    async def run():
        stream = OutputStream(0.05)
        reader = asyncio.create_task(stream.get())
        await asyncio.sleep(0.01)
        assert not reader.done()
        error = RuntimeError("the engine died")
        stream.fail(error)
        return await asyncio.wait_for(reader, 1), error

    item, error = asyncio.run(run())
    assert item is error


def test_a_failing_hook_costs_nothing_but_its_own_call(caplog):
    def hook(out):
        raise ValueError("metrics bug")

    outputs = [output(1), output(2, "stop")]
    got = asyncio.run(read(OutputStream(0, hook), outputs, 0.001))
    assert [item for _, item in got] == outputs
    assert "on_output hook failed" in caplog.text
