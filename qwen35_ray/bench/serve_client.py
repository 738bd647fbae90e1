"""The HTTP side of `qwen35-ray bench serve`: one streamed request to an OpenAI-compatible
server, timed per output chunk, and the load that sends many (closed loop at a fixed
concurrency, open loop with Poisson or gamma arrivals, or both)."""

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qwen35_ray.bench.serve_metrics import RequestRecord


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: a completions prompt (token ids or text) or chat messages;
    prompt_len is what the client knows of its length (the server's usage replaces it)."""

    prompt: list[int] | str | None
    messages: list[dict] | None
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    route: str  # "completions" or "chat"
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float | None = 0.0
    extra_body: dict | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + (
            "/v1/chat/completions" if self.route == "chat" else "/v1/completions"
        )

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, req: BenchRequest) -> dict:
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if self.route == "chat":
            body.update(messages=req.messages, max_completion_tokens=req.output_len)
        else:
            body.update(prompt=req.prompt, max_tokens=req.output_len)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **(self.extra_body or {})}

    def output_of(self, event: dict) -> str | None:
        """The output text an SSE event carries, or None for one that carries none: the usage
        event; in chat, the opening role delta and the closing finish_reason delta, which a
        server may send before the first token and after the last."""
        choices = event.get("choices")
        if not choices:
            return None
        if self.route != "chat":
            return choices[0].get("text") or ""
        delta = choices[0].get("delta") or {}
        pieces = [delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning")]
        if any(pieces) or delta.get("tool_calls"):
            return "".join(p for p in pieces if p)
        return None


class SSEParser:
    """Server-sent events from bytes as they arrive: feed() returns the data of every event
    completed so far (a blank line ends an event; `data:` lines of one event are joined by
    newlines; comment lines, starting with ':', are skipped)."""

    def __init__(self):
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while (nl := self._buf.find(b"\n")) >= 0:
            line, self._buf = self._buf[:nl].rstrip(b"\r"), self._buf[nl + 1 :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append((value[1:] if value.startswith(b" ") else value).decode())
        return events

    def close(self) -> list[str]:
        """What a stream that ended without a last blank line still held."""
        return self.feed(b"\n\n") if self._buf or self._data else []


async def send(session, ep: Endpoint, req: BenchRequest, count_tokens=None) -> RequestRecord:
    """Send one streamed request and time it. count_tokens(text) -> int counts the output when
    the server sends no usage. A failure is recorded in the record, never raised."""
    rec = RequestRecord(prompt_len=req.prompt_len)
    start = rec.start_time = time.perf_counter()
    seen = {"last": None, "usage": None}
    text: list[str] = []

    def take(data: str, now: float) -> None:
        if data.strip() == "[DONE]":
            return
        event = json.loads(data)
        if event.get("error"):
            raise StreamError(f"error event: {json.dumps(event['error'])[:300]}")
        seen["usage"] = event.get("usage") or seen["usage"]
        piece = ep.output_of(event)
        if piece is None:
            return
        if seen["last"] is None:
            rec.ttft = now - start
        else:
            rec.itl.append(now - seen["last"])
        seen["last"] = now
        text.append(piece)

    try:
        async with session.post(ep.url, json=ep.body(req), headers=ep.headers) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            parser = SSEParser()
            async for chunk in resp.content.iter_any():
                # one clock reading per network read: events that came together arrived together
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    take(data, now)
            for data in parser.close():
                take(data, time.perf_counter())
    except Exception as e:  # a failed request is counted and reported, never fatal to the run
        rec.error = str(e) if isinstance(e, StreamError) else f"{type(e).__name__}: {e}"
        return rec
    if seen["last"] is None:
        rec.error = "the stream ended without any output"
        return rec
    rec.latency = seen["last"] - start
    rec.generated_text = "".join(text)
    usage = seen["usage"]
    if usage and usage.get("completion_tokens") is not None:
        rec.output_tokens = usage["completion_tokens"]
        rec.prompt_len = usage.get("prompt_tokens") or rec.prompt_len
    elif count_tokens is not None:
        rec.output_tokens, rec.output_tokens_source = count_tokens(rec.generated_text), "tokenizer"
    else:
        rec.output_tokens, rec.output_tokens_source = len(rec.itl) + 1, "chunks"
    rec.success = True
    return rec


class StreamError(Exception):
    """The server reported an error inside a stream it had begun with 200."""


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the run's start at which each request arrives: all at 0 for an infinite
    rate, else gaps drawn from a gamma distribution of mean 1/rate and shape burstiness (1: a
    Poisson process; below 1 burstier, above 1 more even), as vLLM draws them (unscaled)."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate ({rate}) and burstiness ({burstiness}) must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


async def run_load(
    send_one: Callable[[BenchRequest], Awaitable[RequestRecord]],
    requests: list[BenchRequest],
    max_concurrency: int | None,
    rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time, at most max_concurrency in flight (None: no
    limit); a request waiting for a slot starts when one frees, in arrival order. Returns
    the records in request order and the run's duration (first arrival slot to last answer)."""
    offsets = arrival_offsets(len(requests), rate, burstiness, seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(req: BenchRequest, at: float) -> RequestRecord:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            return await send_one(req)
        async with slots:
            return await send_one(req)

    t0 = time.perf_counter()
    records = await asyncio.gather(*(one(r, at) for r, at in zip(requests, offsets)))
    return list(records), time.perf_counter() - t0


def session(request_timeout: float):
    """An aiohttp session with no cap on connections (aiohttp's default of 100 would hold back
    a higher concurrency) and a per-read timeout instead of a total one."""
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=request_timeout),
    )


async def first_model(base_url: str, api_key: str | None, timeout: float = 30) -> str:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(base_url.rstrip("/") + "/v1/models", headers=headers) as resp:
            if resp.status != 200:
                raise SystemExit(
                    f"bench serve: GET {base_url}/v1/models answered {resp.status}; "
                    "pass --model, or check --base-url and --api-key"
                )
            data = (await resp.json(content_type=None))["data"]
    if not data:
        raise SystemExit(f"bench serve: {base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]
