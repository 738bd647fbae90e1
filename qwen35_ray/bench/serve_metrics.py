"""The figures of `qwen35-ray bench serve` from per-request records, defined as `vllm bench serve`
defines them and named as its result JSON names them:

- TTFT: from sending the request to the first streamed chunk that carries output;
- ITL: the gaps between successive output chunks (a chunk holding several tokens is one gap);
- TPOT: per request, (latency - TTFT) / (output tokens - 1), for requests of 2 tokens or more;
- E2EL (`latency`): from sending the request to its last output chunk;
- throughputs: totals over the run's duration (first send to last answer);
- goodput: requests per second that met every SLO given (`--goodput ttft:500 tpot:50`, in ms;
  a request of one token has TPOT 0 for this test, as vLLM counts it).

Percentiles interpolate linearly between ranks (numpy's default); std is the population std.
Where vLLM writes 0 for a figure with no values (no request had two tokens) this writes null.
"""

from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds, start_time on perf_counter's clock."""

    prompt_len: int = 0
    output_tokens: int = 0
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    success: bool = False
    error: str = ""
    generated_text: str = ""
    # where output_tokens came from: "usage" (the server's count), "tokenizer" (the text
    # re-tokenized, when the server sent no usage), "chunks" (no usage and no tokenizer: one
    # token per chunk) or "engine" (the offline run)
    output_tokens_source: str = "usage"

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(
                f"--goodput {pair!r}: give NAME:MILLISECONDS with NAME one of "
                f"{', '.join(SLO_NAMES)}, e.g. ttft:500 tpot:50"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {pair!r}: {value!r} is not a number of ms") from None
        if ms < 0:
            raise ValueError(f"--goodput {pair!r}: an SLO must be >= 0 ms")
        slo[name] = ms
    return slo


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[name] * 1000 <= ms for name, ms in slo.items())


def distribution(name: str, seconds: list[float], percentiles: list[float]) -> dict:
    """mean_/median_/std_/p<q>_<name>_ms of values given in seconds; null when there are none."""
    ms = np.asarray(seconds, dtype=float) * 1000
    out = {}
    for key, fn in (("mean", np.mean), ("median", np.median), ("std", np.std)):
        out[f"{key}_{name}_ms"] = float(fn(ms)) if ms.size else None
    for q in percentiles:
        word = str(int(q)) if int(q) == q else str(q)
        out[f"p{word}_{name}_ms"] = float(np.percentile(ms, q)) if ms.size else None
    return out


def peak_output_tokens_per_s(done: list[RequestRecord]) -> float:
    """Most output chunks that arrived within one whole second of the run (from its first
    send), counting each chunk as one token as vLLM does."""
    if not done:
        return 0.0
    t0 = min(r.start_time for r in done)
    seconds = int(np.ceil(max(r.start_time + r.latency for r in done) - t0)) + 1
    counts = np.zeros(seconds)
    for r in done:
        t = r.start_time + r.ttft + np.cumsum([0.0, *r.itl])
        np.add.at(counts, np.clip((t - t0).astype(int), 0, seconds - 1), 1)
    return float(counts.max())


def peak_concurrency(done: list[RequestRecord]) -> int:
    """Most requests in flight at once, over half-open intervals [start, start + latency)."""
    events = sorted(
        [(r.start_time, 1) for r in done] + [(r.start_time + r.latency, -1) for r in done]
    )
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def summarize(
    records: list[RequestRecord],
    duration: float,
    percentiles: list[float],
    slo: dict[str, float] | None = None,
) -> dict:
    """The run's figures under vLLM's result-JSON names."""
    done = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    out = {
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": (sum(meets_slo(r, slo) for r in done) / duration) if slo else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_output_tokens_per_s(done),
        "max_concurrent_requests": peak_concurrency(done),
    }
    values = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    for name in METRICS:
        out.update(distribution(name, values[name], percentiles))
    return out


def detailed(records: list[RequestRecord]) -> dict:
    """The per-request lists vLLM writes with --save-detailed."""
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itl for r in records],
        "latencies": [r.latency for r in records],
        "start_times": [r.start_time for r in records],
        "generated_texts": [r.generated_text for r in records],
        "errors": [r.error for r in records],
    }
