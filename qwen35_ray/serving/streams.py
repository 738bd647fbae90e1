"""Helpers for response streams from LLMServer: guard, collect, merge, prime, SSE encoding."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import StreamingResponse

from qwen35_ray.serving.errors import OpenAIError, Overloaded, raise_error_item

log = logging.getLogger("qwen35_ray.serving")

REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


async def guarded(
    make_stream: Callable,
    retries: int,
    counters=None,
    prefix: str = "",
    is_output: Callable[[dict], bool] = lambda step: True,
    role: str = "serving",
) -> AsyncIterator[dict]:
    """Run a replica's response stream (make_stream() calls the Serve handle), for the client.

    - A replica lost before it sent any output (is_output): the request runs again on another
      one, up to `retries` times; after that, or once output was sent, it ends with a 503.
    - An error item from the replica (errors.OpenAIError.as_item) is raised here.
    - Serve's own queue full (BackPressureError): a 503 with Retry-After.
    - The consumer leaving (client gone): the replica's stream is cancelled, so the engine
      aborts the request at once instead of generating for nobody.
    counters (a Counter or None) counts `{prefix}replica_failures_total` and
    `{prefix}retries_total`; role names the replica's part in errors ("decoding")."""
    for attempt in range(1 + retries):
        sent, ended, stream = False, False, make_stream()
        try:
            async for step in stream:
                if "error" in step:
                    ended = True
                    raise_error_item(step)
                sent = sent or is_output(step)
                yield step
            ended = True
            return
        except BackPressureError:
            ended = True
            raise Overloaded("the server is overloaded; retry later") from None
        except REPLICA_LOST as e:
            ended = True
            if counters is not None:
                counters[f"{prefix}replica_failures_total"] += 1
            if sent or attempt == retries:
                log.warning("replica lost mid-request: %s", type(e).__name__)
                raise Overloaded(
                    f"the replica {role} this request failed; retry the request",
                    type="service_unavailable",
                ) from None
            log.warning("replica lost before any output; retrying elsewhere")
            if counters is not None:
                counters[f"{prefix}retries_total"] += 1
            await asyncio.sleep(0.2 * (attempt + 1))
        finally:
            # left early: the client went away, or its request failed here
            if not ended and hasattr(stream, "cancel"):
                stream.cancel()


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
