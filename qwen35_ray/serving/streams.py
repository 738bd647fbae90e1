"""Helpers for response streams from LLMServer: collect, merge, prime, and SSE encoding."""

import asyncio
import json
import logging

from starlette.responses import StreamingResponse

from qwen35_ray.serving.errors import OpenAIError

log = logging.getLogger("qwen35_ray.serving")


async def collect(stream, n):
    texts, tokens, lps, reasons = (
        [""] * n,
        [[] for _ in range(n)],
        [[] for _ in range(n)],
        [None] * n,
    )
    async for step in stream:
        for d in step["outputs"]:
            i = d["index"]
            texts[i] += d["text"]
            tokens[i] += d["token_ids"]
            lps[i] += d["logprobs"] or []
            reasons[i] = d["finish_reason"] or reasons[i]
    return texts, tokens, lps, reasons


async def merge(streams):
    """Interleave several response streams as (stream index, item)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, s):
        try:
            async for item in s:
                await queue.put((k, item))
        except Exception as e:
            await queue.put((k, e))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            k, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


async def primed(stream):
    """Wait for a stream's first item, so that errors before any output (overload, invalid
    sampling values) reach the client as an HTTP status rather than inside a 200 stream."""
    first = await stream.__anext__()

    async def rest():
        yield first
        async for item in stream:
            yield item

    return rest()


def usage(prompt_tokens: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def sse(events):
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except OpenAIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception:
            log.exception("stream failed")
            yield f"data: {json.dumps(OpenAIError('internal server error', 500).body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
