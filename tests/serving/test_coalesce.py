"""serving/coalesce.py: a replica's stream deltas merged per interval without losing, reordering
or delaying what a client must get at once."""

import asyncio
import time

import pytest

from qwen35_ray.serving.coalesce import coalesced, merge


def step(*tokens, finish=None, index=0, logprobs=False, cached=0):
    return {
        "outputs": [
            {
                "index": index,
                "text": "".join(f"t{t}" for t in tokens),
                "token_ids": list(tokens),
                "logprobs": [{t: -1.0} for t in tokens] if logprobs else None,
                "finish_reason": finish,
            }
        ],
        "num_cached_tokens": cached,
    }


async def engine(items, gap_s=0.0, error=None, log=None):
    """items at gap_s apart, as a replica's _deltas yields them; log records its end."""
    try:
        for item in items:
            await asyncio.sleep(gap_s)
            yield item
        if error is not None:
            raise error
    finally:
        if log is not None:
            log.append("closed")


async def timed(stream):
    start, out = time.monotonic(), []
    async for item in stream:
        out.append((time.monotonic() - start, item))
    return out


def tokens(items):
    return [t for item in items for d in item["outputs"] for t in d["token_ids"]]


def test_merge_joins_each_outputs_text_tokens_and_logprobs_in_order():
    a = step(1, 2, logprobs=True)
    b = {"outputs": [], "num_cached_tokens": 0}
    c = step(3, logprobs=True, cached=8)
    d = step(7, index=1)
    e = step(4, finish="length", logprobs=True, cached=16)
    m = merge([{**a, "replica": "r1"}, b, c, d, e])
    out0, out1 = m["outputs"]
    assert out0["token_ids"] == [1, 2, 3, 4] and out0["text"] == "t1t2t3t4"
    assert out0["logprobs"] == [{1: -1.0}, {2: -1.0}, {3: -1.0}, {4: -1.0}]
    assert out0["finish_reason"] == "length"
    assert out1["token_ids"] == [7] and out1["finish_reason"] is None
    assert m["num_cached_tokens"] == 16 and m["replica"] == "r1"
    # the inputs are not changed
    assert a["outputs"][0]["token_ids"] == [1, 2]


def test_zero_interval_passes_every_item_through():
    items = [step(i) for i in range(5)] + [step(5, finish="stop")]
    out = asyncio.run(timed(coalesced(engine(items), 0)))
    assert [item for _, item in out] == items


def test_first_token_goes_at_once_then_at_most_one_item_per_interval():
    # 40 tokens 5 ms apart (0.2 s), interval 50 ms: the first at once, then about 4 per item
    items = [{"outputs": [], "num_cached_tokens": 0}] + [step(i) for i in range(39)]
    items.append(step(39, finish="length"))
    out = asyncio.run(timed(coalesced(engine(items, gap_s=0.005), 0.05)))
    got = [item for _, item in out]
    assert tokens(got) == list(range(40))
    # the empty first step and the first token, each as it came
    assert got[0]["outputs"] == [] and tokens(got[1:2]) == [0]
    assert out[1][0] < 0.03
    assert got[-1]["outputs"][0]["finish_reason"] == "length"
    times = [t for t, item in out if tokens([item])]
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    # items after the first token at least an interval apart but the last (a finish, at once)
    assert all(g >= 0.045 for g in gaps[:-1])
    assert len(out) <= 2 + 0.25 / 0.05 + 2


def test_the_finish_is_sent_at_once_with_what_was_held():
    items = [step(0), step(1), step(2, finish="stop")]
    out = asyncio.run(timed(coalesced(engine(items, gap_s=0.01), 1.0)))
    # without the finish rule the last item would wait for the 1 s interval
    assert out[-1][0] < 0.5
    assert tokens([item for _, item in out]) == [0, 1, 2]
    assert out[-1][1]["outputs"][0]["finish_reason"] == "stop"


def test_an_error_comes_after_the_tokens_held_before_it():
    items = [step(0), step(1), step(2)]

    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine failed"):
            async for item in coalesced(engine(items, 0.01, RuntimeError("engine failed")), 1.0):
                got.append(item)
        return got

    assert tokens(asyncio.run(run())) == [0, 1, 2]


def test_leaving_early_closes_the_engine_stream():
    log = []

    async def run():
        stream = coalesced(engine([step(i) for i in range(100)], 0.01, log=log), 0.05)
        async for item in stream:
            if tokens([item]):
                break
        await stream.aclose()
        return log

    assert asyncio.run(run()) == ["closed"]
