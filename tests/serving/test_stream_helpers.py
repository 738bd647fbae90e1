"""streams.merge and streams.primed: every item of every stream, and a consumer that leaves
early closes the replica streams under it at once (so the engine aborts the request), with one
stream (read directly) as with several (through tasks)."""

import asyncio

from qwen35_ray.serving.streams import merge, primed


def source(name, n, log):
    async def gen():
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield f"{name}{i}"
        finally:
            log.append(f"{name} closed")

    return gen()


def test_merge_gives_every_item_of_one_or_several_streams():
    async def run(names):
        log = []
        got = [(k, item) async for k, item in merge([source(n, 3, log) for n in names])]
        return got, log

    got, log = asyncio.run(run(["a"]))
    assert got == [(0, "a0"), (0, "a1"), (0, "a2")] and log == ["a closed"]
    got, log = asyncio.run(run(["a", "b"]))
    assert sorted(got) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1"), (1, "b2")]
    assert sorted(log) == ["a closed", "b closed"]


def test_leaving_a_merge_early_closes_its_primed_streams_at_once():
    async def run(names):
        log = []
        streams = [await primed(source(n, 100, log)) for n in names]
        merged = merge(streams)
        async for _ in merged:
            break
        await merged.aclose()
        # closed by aclose itself, not later by the collector or asyncio.run's shutdown
        return list(log)

    assert asyncio.run(run(["a"])) == ["a closed"]
    assert sorted(asyncio.run(run(["a", "b"]))) == ["a closed", "b closed"]
