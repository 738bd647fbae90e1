"""An engine replica's metrics (LLMServer, PrefillServer, DecodeServer), in its own
prometheus_client registry; serving/metrics.py gathers it into the app's /metrics.

Per request, RequestTimer records vLLM's request metrics as the replica streams it:
time to first token, inter-token latency, end-to-end latency, queue time, prefill and decode
time, prompt and generation lengths, and the finish reason. They are this replica's view: the
clock starts when the replica's generate/prefill/decode starts (the ingress's histograms give
the client's view, Serve's queue and HTTP included). In the disaggregated app a request's TTFT
and prompt are counted on the prefill replica and the rest (ITL, end-to-end, finish) on the
decode replica that imported it; summed over pools every request counts once.

At scrape time EngineStats reads what the replica already counts: the engine's queues, cache
occupancy, preemptions, prefix-cache lookups, speculative decoding's drafts and accepted tokens
(when it is on), step counters, the replica's request counters, and the expert-parallel
samples.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from qwen35_ray.serving.metrics_catalog import (
    BUCKETS,
    VLLM_ENGINE_STATS,
    families,
    help_of,
    indexed,
    token_buckets,
)

LABELS = ("pool", "replica", "model_name")
# finish reasons that complete a request: its end-to-end, decode time and length are observed
COMPLETED = ("stop", "length")


class EngineMetrics:
    """The registry of one engine replica. stats: the replica's stats() (engine stats, its
    counters, and "labelled" expert samples), read at each scrape."""

    def __init__(self, pool: str, replica: str, model_name: str, max_model_len: int, stats):
        self.labels = {"pool": pool, "replica": replica, "model_name": model_name}
        self.registry = CollectorRegistry(auto_describe=False)
        names = list(LABELS)

        def histogram(name: str, buckets) -> Histogram:
            h = Histogram(name, help_of(name), names, registry=self.registry, buckets=buckets)
            return h.labels(**self.labels)

        def counter(name: str) -> Counter:
            return Counter(name, help_of(name), names, registry=self.registry).labels(**self.labels)

        self.ttft = histogram("qwen35_ray:time_to_first_token_seconds", BUCKETS["ttft"])
        self.itl = histogram("qwen35_ray:inter_token_latency_seconds", BUCKETS["itl"])
        self.e2e = histogram("qwen35_ray:e2e_request_latency_seconds", BUCKETS["request"])
        self.queue = histogram("qwen35_ray:request_queue_time_seconds", BUCKETS["request"])
        self.prefill = histogram("qwen35_ray:request_prefill_time_seconds", BUCKETS["request"])
        self.decode = histogram("qwen35_ray:request_decode_time_seconds", BUCKETS["request"])
        lengths = token_buckets(max_model_len)
        self.prompt_len = histogram("qwen35_ray:request_prompt_tokens", lengths)
        self.output_len = histogram("qwen35_ray:request_generation_tokens", lengths)
        self.prompt_tokens = counter("qwen35_ray:prompt_tokens")
        self.generation_tokens = counter("qwen35_ray:generation_tokens")
        self._success = Counter(
            "qwen35_ray:request_success",
            help_of("qwen35_ray:request_success"),
            [*names, "finished_reason"],
            registry=self.registry,
        )
        # every reason from the start, so a rate() over it sees the first request
        for reason in ("stop", "length", "abort", "error"):
            self._success.labels(**self.labels, finished_reason=reason)
        self.registry.register(EngineStats(stats, self.labels))

    def success(self, reason: str) -> None:
        self._success.labels(**self.labels, finished_reason=reason).inc()

    def request(self, num_prompt_tokens: int, kind: str = "new", generated: int = 0):
        """Start timing one request: "new" (prefilled here: TTFT and prompt counted),
        "resumed" (a stream migrated here: it prefills again, but its first token is no
        TTFT) or "imported" (prefilled elsewhere: it joins the running batch at once).
        generated: output tokens it has from elsewhere (in its length, not counted here)."""
        timer = RequestTimer(self, num_prompt_tokens, kind)
        timer.generated = generated
        return timer

    def collect(self) -> list:
        return list(self.registry.collect())


class RequestTimer:
    def __init__(self, m: EngineMetrics, num_prompt_tokens: int, kind: str):
        self.m, self.num_prompt_tokens, self.kind = m, num_prompt_tokens, kind
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.queue_time: float | None = None
        self.generated = 0

    def step(self, num_tokens: int, queue_time: float | None) -> None:
        """One output of the engine: num_tokens new tokens over all its outputs; queue_time
        (RequestOutput.queue_time) once the engine scheduled it."""
        now = time.monotonic()
        if self.queue_time is None and queue_time is not None and self.kind != "imported":
            self.queue_time = queue_time
            self.m.queue.observe(queue_time)
        if num_tokens == 0:
            return
        self.generated += num_tokens
        self.m.generation_tokens.inc(num_tokens)
        if self.first is None:
            self.first = now
            if self.kind == "new":
                self.m.ttft.observe(now - self.start)
                self.m.prompt_tokens.inc(self.num_prompt_tokens)
                self.m.prompt_len.observe(self.num_prompt_tokens)
                self.m.prefill.observe(max(0.0, now - self.start - (self.queue_time or 0.0)))
        else:
            # once per engine step, as vLLM does: n > 1 outputs gain a token each
            self.m.itl.observe(now - self.last)
        self.last = now

    def finish(self, reason: str | None) -> None:
        """The request ended here with `reason`; None: it left (a prefill handed off)."""
        if reason is None:
            return
        self.m.success(reason)
        if reason in COMPLETED:
            now = time.monotonic()
            self.m.e2e.observe(now - self.start)
            self.m.output_len.observe(self.generated)
            if self.first is not None:
                self.m.decode.observe(now - self.first)


def request_reason(reasons: list[str | None]) -> str:
    """A request's finish reason from its outputs': an error or abort of any, else the
    first output's."""
    for worst in ("error", "abort"):
        if worst in reasons:
            return worst
    return reasons[0] or "abort"


class EngineStats:
    """A prometheus_client collector over the replica's stats() at scrape time."""

    def __init__(self, stats, labels: dict[str, str]):
        self.stats, self.labels = stats, labels

    def collect(self):
        s = dict(self.stats())
        labelled = s.pop("labelled", [])
        out = [
            ("qwen35_ray:kv_cache_usage_perc", {}, _used(s, "kv_blocks")),
            ("qwen35_ray_state_slot_usage_perc", {}, _used(s, "state_slots")),
        ]
        # the engine's own count of sampled tokens: qwen35_ray:generation_tokens_total counts
        # what the replica streamed
        s.pop("generation_tokens_total", None)
        for key, value in s.items():
            name = VLLM_ENGINE_STATS.get(key, f"qwen35_ray_{key}")
            if isinstance(value, list):
                out += indexed(name, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((name, {}, value))
        out += [(f"qwen35_ray_{name}", own, v) for name, own, v in labelled]
        yield from families(out, self.labels)


def _used(stats: dict, what: str) -> float:
    total = stats[f"{what}_total"]
    return 1 - stats[f"{what}_free"] / total if total else 0.0
