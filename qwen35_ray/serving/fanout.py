"""Several response streams for one request (a /v1/completions prompt list): started and
finished together, so that when one fails no sibling keeps generating for nobody."""

import asyncio
import contextlib
import logging

from qwen35_ray.serving.streams import collect, primed

log = logging.getLogger("qwen35_ray.serving")


async def start_all(streams: list) -> list:
    """Each stream primed (its first item in hand); if any fails, all are closed and its
    error is raised."""
    started = await asyncio.gather(*(primed(s) for s in streams), return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        await close_all(streams)
        raise failed[0]
    return started


async def collect_all(streams: list, n: int) -> list:
    """collect() of every stream; the first failure cancels and closes the rest."""
    tasks = [asyncio.ensure_future(collect(s, n)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
        raise


async def close_all(streams: list) -> None:
    """Stop streams from the LLM servers: a Serve response generator is cancelled (its replica
    aborts the request), an async generator closed (its own cleanup cancels what it runs)."""
    for s in streams:
        if hasattr(s, "cancel"):
            s.cancel()
        elif hasattr(s, "aclose"):
            # a generator that ended or is running elsewhere needs nothing more from us
            with contextlib.suppress(Exception):
                await s.aclose()
