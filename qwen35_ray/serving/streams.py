"""Helpers for response streams from LLMServer: guard, collect, merge, prime, SSE encoding.

Migration (guarded with a Migration): a stream of one output whose replica is lost once the
client has some of it (the replica died, or Serve stopped it and killed it at the end of its
graceful_shutdown_timeout_s) resumes on another replica, which prefills the prompt plus the
tokens sent and continues. The ingress gives every request a seed and the engine's draw for a
token depends on the seed and the token's position alone, so the resumed stream samples what
the lost one would have; the grammar, penalties, stop strings and max_tokens see the tokens sent
(engine/resume.py). Serve 2.60 tells a stopping replica nothing before its requests are done
(its __del__ runs after the drain), so a replica never hands its streams over itself.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import StreamingResponse

from qwen35_ray.serving.errors import OpenAIError, Overloaded, raise_error_item

log = logging.getLogger("qwen35_ray.serving")

REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


@dataclass(frozen=True)
class Migration:
    """How a stream (n=1) resumes on another replica once the client has some of its output.

    resume(progress) starts the replica stream that continues from
    `{"token_ids", "logprobs", "text_chars"}` (what the client has of output 0); `limit`
    bounds the resumes of one request; `first` is a step the client was sent from elsewhere
    before this stream's own (the prefill replica's first token)."""

    resume: Callable[[dict], AsyncIterator[dict]]
    limit: int
    first: dict | None = None


class _Progress:
    """What the client has been sent of output 0: the tokens, their logprobs (None when not
    requested) and the number of text characters."""

    def __init__(self, first: dict | None):
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.text_chars, self.finished = 0, False
        if first is not None:
            self.add(first)

    def add(self, step: dict) -> None:
        for d in step.get("outputs", ()):
            if d["index"] != 0:
                continue
            self.token_ids += d["token_ids"]
            if d.get("logprobs") is not None:
                self.logprobs = self.logprobs or []
                self.logprobs += d["logprobs"]
            self.text_chars += len(d.get("text", ""))
            self.finished = self.finished or d.get("finish_reason") is not None

    @property
    def started(self) -> bool:
        return bool(self.token_ids) or self.text_chars > 0

    def resume(self) -> dict:
        return {
            "token_ids": list(self.token_ids),
            "logprobs": None if self.logprobs is None else list(self.logprobs),
            "text_chars": self.text_chars,
        }


class _EngineLost(Exception):
    """A replica whose engine died ended the stream (errors.EngineLost): a replica lost."""


class _Unavailable(Exception):
    """A resumed stream its replica refused (503) before any output: another may take it."""


async def guarded(
    make_stream: Callable,
    retries: int,
    counters=None,
    prefix: str = "",
    is_output: Callable[[dict], bool] = lambda step: True,
    role: str = "serving",
    migration: Migration | None = None,
) -> AsyncIterator[dict]:
    """Run a replica's response stream (make_stream() calls the Serve handle), for the client.

    - A replica lost before this stream sent any output (is_output): the request runs again on
      another one, up to `retries` times.
    - A replica lost once the client has output (migration given, n=1): the request resumes on
      another replica from the prompt plus what the client has (Migration.resume), up to
      Migration.limit times; a resume its replica refuses (503) counts as one of them. Serve's
      router reserves a slot on a replica before it sends a request, and drops a replica whose
      reservation raises ActorDiedError, so a resume never lands on the lost replica. A
      replica whose engine died ends its streams with an EngineLost item and exits: lost too.
    - Otherwise, or after that, a 503: an error event when the stream has started.
    - An error item from the replica (errors.OpenAIError.as_item) is raised here.
    - Serve's own queue full (BackPressureError): a 503 with Retry-After.
    - The consumer leaving (client gone): the replica's stream is cancelled, so the engine
      aborts the request at once instead of generating for nobody.
    counters (a Counter or None) counts `{prefix}replica_failures_total`,
    `{prefix}retries_total`, `migrations_total` and `migration_failures_total`; role names the
    replica's part in errors ("decoding")."""
    progress = _Progress(migration.first) if migration is not None else None
    attempts = migrations = 0
    resume: dict | None = None
    while True:
        sent, ended = False, False
        stream = make_stream() if resume is None else migration.resume(resume)
        try:
            async for step in stream:
                if "error" in step:
                    ended = True
                    # the replica's engine died: its process is about to go, as good as lost
                    if step.get("lost"):
                        raise _EngineLost(step["error"]["message"])
                    # a resume refused (overloaded): another replica may take it
                    if resume is not None and not sent and step["error"]["code"] == 503:
                        raise _Unavailable(step["error"]["message"])
                    raise_error_item(step)
                sent = sent or is_output(step)
                if progress is not None:
                    progress.add(step)
                yield step
            ended = True
            return
        except BackPressureError:
            ended = True
            if resume is None:
                raise Overloaded("the server is overloaded; retry later") from None
            lost: Exception = _Unavailable("Serve's queue is full")
        except (*REPLICA_LOST, _EngineLost, _Unavailable) as e:
            # an unreachable replica may still be running the request
            ended = not isinstance(e, ActorUnavailableError)
            lost = e
        finally:
            # left early: the client went away, or its request failed here
            if not ended and hasattr(stream, "cancel"):
                with contextlib.suppress(Exception):
                    stream.cancel()
        if not isinstance(lost, _Unavailable) and counters is not None:
            counters[f"{prefix}replica_failures_total"] += 1
        if progress is not None and progress.finished:
            # the client has the whole output; only the stream's end was lost
            return
        if resume is None and not sent and attempts < retries:
            attempts += 1
            log.warning("replica lost before any output; retrying elsewhere")
            if counters is not None:
                counters[f"{prefix}retries_total"] += 1
        elif progress is not None and (sent or progress.started):
            if migrations == migration.limit:
                if counters is not None:
                    counters["migration_failures_total"] += 1
                log.warning("replica lost mid-stream after %d resumes; giving up", migrations)
                again = f", and so did {migrations} resumes elsewhere" if migrations else ""
                raise Overloaded(
                    f"the replica {role} this request failed{again}; retry the request",
                    type="service_unavailable",
                ) from None
            migrations += 1
            resume = progress.resume()
            log.warning(
                "replica lost after %d tokens (%s); resuming elsewhere",
                len(resume["token_ids"]),
                type(lost).__name__,
            )
            if counters is not None:
                counters["migrations_total"] += 1
        else:
            log.warning("replica lost mid-request: %s", type(lost).__name__)
            raise Overloaded(
                f"the replica {role} this request failed; retry the request",
                type="service_unavailable",
            ) from None
        await asyncio.sleep(0.2 * (attempts + migrations))


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
    """Interleave several response streams as (stream index, item). One stream (the usual
    request) is read directly: no task and queue hop per item."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
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
        # their streams closed before the consumer goes on (the engines abort at once)
        await asyncio.gather(*tasks, return_exceptions=True)


async def primed(stream):
    """Wait for a stream's first item, so that errors before any output (overload, invalid
    sampling values) reach the client as an HTTP status rather than inside a 200 stream."""
    first = await stream.__anext__()

    async def rest():
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            # closed early (the client left): close the stream now, not when collected
            if (aclose := getattr(stream, "aclose", None)) is not None:
                await aclose()

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
