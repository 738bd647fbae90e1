"""At the ingress: one log line per HTTP request, and the ingress replica's own metrics.

RequestLogMiddleware (ASGI, around every route) opens a RequestRecord for the request, which
`tap` fills as the replica streams pass through the ingress (prompt and generated tokens, the
first token's time, finish reasons). When the response has been sent, or the client left, it
counts the request by route, method and status, observes the client-side latencies, and, with
`log_requests` (on by default), writes one line to the replica's log (Serve's `ray.serve`
logger):

    request id=7c1e... route=/v1/chat/completions method=POST status=200 prompt_tokens=25
    completion_tokens=12 ttft_s=0.084 total_s=0.231 finish=length

`id` is Serve's request id, the `x-request-id` header of the response. No prompt text unless
`log_prompts: true`, which adds `prompt="..."` (JSON-escaped, at most PROMPT_LOG_CHARS).
Status 499: the client left before the response started; `client_gone=1`: it left during it.
/metrics and /health are neither logged nor counted.
"""

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError

from qwen35_ray.serving.metrics_catalog import BUCKETS, families, help_of

# a child of Serve's logger, so the line lands in the replica's log (Serve writes its INFO)
log = logging.getLogger("ray.serve.requests")

PROMPT_LOG_CHARS = 4096
CLIENT_GONE = 499
# scrapes and probes: neither logged nor counted (a scrape every 15 s would drown the log)
UNLOGGED = ("/metrics", "/health")
# what a client controls is logged in these characters only (others become _), this long at
# most: a client-given x-request-id, and the path of a request no route matched
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")
ID_CHARS = 128
# the method label of the HTTP counter: these, or "other" (a client may send any token)
METHODS = ("GET", "POST", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS")

_record: contextvars.ContextVar = contextvars.ContextVar("qwen35_ray_request", default=None)


@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    route: str | None = None
    status: int | None = None
    client_gone: bool = False
    # Serve cancelled its replica streams: the client left (the response may still end
    # normally, with the error event that cancellation becomes)
    cancelled: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    finish: list[str] = field(default_factory=list)
    prompt: list[list[int]] = field(default_factory=list)

    def line(self, total_s: float, prompt_text: str | None = None) -> str:
        ttft = "-" if self.first_token is None else f"{self.first_token - self.start:.3f}"
        parts = [
            f"request id={self.id}",
            f"route={self.route or _UNSAFE.sub('_', self.path)[:ID_CHARS]}",
            f"method={_UNSAFE.sub('_', self.method)[:16]}",
            f"status={self.status}",
            f"prompt_tokens={self.prompt_tokens}",
            f"completion_tokens={self.completion_tokens}",
            f"ttft_s={ttft}",
            f"total_s={total_s:.3f}",
            f"finish={','.join(sorted(set(self.finish))) or '-'}",
        ]
        if self.client_gone:
            parts.append("client_gone=1")
        if prompt_text is not None:
            parts.append(f"prompt={json.dumps(prompt_text)}")
        return " ".join(parts)


def current() -> RequestRecord | None:
    return _record.get()


async def tap(stream, prompt_ids: list[int]):
    """A replica stream for one prompt, passed through while the current request's record
    counts its prompt and tokens and notes when the first token came."""
    record = current()
    if record is None:
        record = RequestRecord("", "", "")  # outside an HTTP request: counted for nobody
    record.prompt_tokens += len(prompt_ids)
    record.prompt.append(prompt_ids)
    try:
        async for step in stream:
            for d in step.get("outputs", ()):
                if d.get("token_ids"):
                    record.completion_tokens += len(d["token_ids"])
                    if record.first_token is None:
                        record.first_token = time.monotonic()
                if d.get("finish_reason"):
                    record.finish.append(d["finish_reason"])
            yield step
    except (asyncio.CancelledError, RequestCancelledError):
        record.cancelled = True
        raise
    finally:
        # closing the tap closes the stream, whose own cleanup cancels the replica's request
        await stream.aclose()


class IngressMetrics:
    """An ingress replica's registry: HTTP requests by route, method and status, the
    client-side TTFT and duration, and `counters()` (the streams' and the Disaggregator's
    counters, a dict read at scrape time)."""

    def __init__(self, pool: str, replica: str, model_name: str, counters):
        self.labels = {"pool": pool, "replica": replica, "model_name": model_name}
        self.registry = CollectorRegistry(auto_describe=False)
        names = [*self.labels, "route"]
        self.requests = Counter(
            "qwen35_ray_http_requests",
            help_of("qwen35_ray_http_requests"),
            [*names, "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "qwen35_ray_http_request_duration_seconds",
            help_of("qwen35_ray_http_request_duration_seconds"),
            names,
            registry=self.registry,
            buckets=BUCKETS["request"],
        )
        self.ttft = Histogram(
            "qwen35_ray_http_time_to_first_token_seconds",
            help_of("qwen35_ray_http_time_to_first_token_seconds"),
            names,
            registry=self.registry,
            buckets=BUCKETS["ttft"],
        )
        self.registry.register(_Counters(counters, self.labels))

    def collect(self) -> list:
        return list(self.registry.collect())

    def observe(self, record: RequestRecord, total_s: float) -> None:
        route = {**self.labels, "route": record.route or "unmatched"}
        method = record.method if record.method in METHODS else "other"
        self.requests.labels(**route, method=method, status=str(record.status)).inc()
        if record.status == 200:
            self.duration.labels(**route).observe(total_s)
        if record.first_token is not None:
            self.ttft.labels(**route).observe(record.first_token - record.start)


class _Counters:
    """A collector of counters kept as a dict elsewhere, read at scrape time."""

    def __init__(self, samples, labels: dict[str, str]):
        self.samples, self.labels = samples, labels

    def collect(self):
        yield from families(self.samples(), self.labels)


@dataclass
class RequestLog:
    """What the middleware does with a finished request; set on the FastAPI app's state by
    the ingress (app.state.request_log)."""

    metrics: IngressMetrics
    log_requests: bool = True
    log_prompts: bool = False
    decode: object = None  # token ids -> text, for log_prompts

    def done(self, record: RequestRecord) -> None:
        total = time.monotonic() - record.start
        self.metrics.observe(record, total)
        if not self.log_requests:
            return
        prompt = None
        if self.log_prompts and record.prompt and self.decode is not None:
            # a token is a character at least: what is logged is within this many
            text = "\n".join(self.decode(ids[:PROMPT_LOG_CHARS]) for ids in record.prompt)
            more = len(text) - PROMPT_LOG_CHARS
            prompt = text[:PROMPT_LOG_CHARS] + (f"...({more} more characters)" if more > 0 else "")
        log.info(record.line(total, prompt))


class RequestLogMiddleware:
    """ASGI middleware: a RequestRecord per HTTP request, handed to app.state.request_log
    once the response is sent, the client left, or the app failed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        sink = getattr(scope["app"].state, "request_log", None) if "app" in scope else None
        if scope["type"] != "http" or sink is None or scope["path"].endswith(UNLOGGED):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        record = RequestRecord(
            _UNSAFE.sub("_", given)[:ID_CHARS] or uuid.uuid4().hex, scope["method"], scope["path"]
        )
        token = _record.set(record)
        sent = cancelled = failed = False

        async def receive_disconnect():
            try:
                message = await receive()
            except TaskCancelledError:
                # Serve's proxy cancelled the request because its client left: a disconnect
                # (Starlette then stops the response), not a fault of the app
                message = {"type": "http.disconnect"}
            # after the whole response, a disconnect is the client done with it
            if message["type"] == "http.disconnect" and not sent:
                record.cancelled = True
            return message

        async def send_status(message):
            nonlocal sent
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent = True
            await send(message)

        try:
            await self.app(scope, receive_disconnect, send_status)
        except asyncio.CancelledError:
            # Serve's proxy cancels the request when the client leaves
            cancelled = True
            raise
        except Exception:
            # Starlette's outermost middleware answers 500
            failed = True
            raise
        finally:
            _record.reset(token)
            record.route = getattr(scope.get("route"), "path", None)
            # Serve cancelled it (or its replica streams), or its response never finished
            gone = cancelled or record.cancelled or (not sent and not failed)
            if record.status is None:
                record.status = CLIENT_GONE if gone else 500
            record.client_gone = gone and record.status != CLIENT_GONE
            if gone:
                # what the replicas record for it too (its streams are cancelled)
                record.finish.append("abort")
            try:
                sink.done(record)
            except Exception:
                log.exception("the request log failed")
