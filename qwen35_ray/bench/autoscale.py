"""`qwen35-ray bench autoscale`: a two-phase bounded load against a running app, the replica
count of each pool over time, and TTFT and ITL per phase.

Phase "prefill": a burst of long prompts with max_tokens 1 (on the disaggregated app they
finish on the prefill pool). Phase "decode": many long decodes of short prompts (under
min_prefill_tokens, so prefilled on the decode pool). After each phase an idle span that ends
once every pool is back at its starting replica count (or after --idle-s). Replica counts come
from serve.status() when this process reaches the cluster (--start-yaml, or --ray-address),
otherwise from the app's /metrics (qwen35_ray_serve_replicas); the policies' last decisions
from /metrics when the app publishes them. Results as JSON (--out) and a PNG plot beside it.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# token ids every Qwen vocabulary has as plain tokens (the tiny one included): prompts are
# random ids, so no two share a prefix and the prefix cache does not shorten a prefill
TOKEN_LO, TOKEN_HI = 10, 1100


@dataclass(frozen=True)
class Phase:
    name: str
    num_requests: int
    concurrency: int
    prompt_tokens: int
    max_tokens: int


@dataclass
class Result:
    """One streamed request, times in seconds from the bench's start."""

    phase: str
    start: float
    end: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


def phases(args) -> list[Phase]:
    return [
        Phase("prefill", args.prefill_requests, args.prefill_concurrency,
              args.prefill_prompt_tokens, 1),
        Phase("decode", args.decode_requests, args.decode_concurrency,
              args.decode_prompt_tokens, args.decode_max_tokens),
    ]  # fmt: skip


def request_bodies(phase: Phase, model: str, seed: int) -> list[dict]:
    """The phase's /v1/completions bodies: distinct random prompts fixed by the seed, greedy,
    ignore_eos so every request decodes exactly max_tokens, streamed with usage."""
    import random

    rng = random.Random(f"{seed}:{phase.name}")
    return [
        {
            "model": model,
            "prompt": [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(phase.prompt_tokens)],
            "max_tokens": phase.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(phase.num_requests)
    ]


def percentiles(values: list[float]) -> dict:
    """p50, p90 (linear interpolation between ranks, as numpy's default) and mean; None for no
    values, so an empty phase reads as unmeasured rather than as zero."""

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p90": None, "mean": None}
    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "mean": sum(ordered) / len(ordered)}


def replica_span(samples: list[dict], start: float, end: float, baseline: dict) -> dict:
    """Per pool over [start, end]: fewest and most running replicas, the seconds from start
    until it first ran more than its starting count, and, for a span that begins above it,
    until it was back (None: it did not)."""
    # the count in force at start is the last sample before it
    before = [s for s in samples if s["t"] < start][-1:]
    inside = before + [s for s in samples if start <= s["t"] <= end]
    out = {}
    for pool, base in baseline.items():
        counts = [(s["t"], s["running"][pool]) for s in inside if pool in s["running"]]
        above = next((max(t - start, 0.0) for t, n in counts if n > base), None)
        # a span that begins above the start (the idle after a load): when it came back
        back = None
        if counts and counts[0][1] > base:
            back = next((max(t - start, 0.0) for t, n in counts if n <= base), None)
        out[pool] = {
            "min": min((n for _, n in counts), default=None),
            "max": max((n for _, n in counts), default=None),
            "above_start_after_s": above,
            "back_to_start_after_s": back,
        }
    return out


def summarize(phase: Phase | None, name: str, results: list[Result], start: float, end: float,
              samples: list[dict], baseline: dict) -> dict:  # fmt: skip
    """One span of the run (a load phase, or idle) as it goes into the JSON."""
    failed = [r for r in results if r.error is not None]
    done = [r for r in results if r.error is None]
    out = {
        "name": name,
        "start_s": start,
        "end_s": end,
        "seconds": end - start,
        "workload": asdict(phase) if phase else None,
        "requests": len(results),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "completion_tokens": sum(r.completion_tokens for r in done),
        "ttft_s": percentiles([r.ttft for r in done if r.ttft is not None]),
        "itl_s": percentiles([gap for r in done for gap in r.itls]),
        "replicas": replica_span(samples, start, end, baseline),
    }
    if done and end > start:
        out["output_tokens_per_s"] = out["completion_tokens"] / (end - start)
    return out


def stream_one(url: str, body: dict, phase: str, t0: float, timeout: float) -> Result:
    """Send one streamed completion; TTFT to its first choice chunk, ITL between the choice
    chunks that follow (a chunk per engine step that gained tokens, as the server sends)."""
    import requests

    r = Result(phase, time.monotonic() - t0)
    last = None
    try:
        with requests.post(
            url + "/v1/completions", json=body, stream=True, timeout=timeout
        ) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return r
            for line in resp.iter_lines(chunk_size=None):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.monotonic() - t0
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                    return r
                if chunk.get("choices"):
                    if last is None:
                        r.ttft = now - r.start
                    else:
                        r.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    r.completion_tokens = chunk["usage"]["completion_tokens"]
        if r.completion_tokens != body["max_tokens"]:
            r.error = f"{r.completion_tokens} of {body['max_tokens']} tokens"
    except Exception as e:  # a failed request is counted and reported, never fatal to the run
        r.error = f"{type(e).__name__}: {e}"
    finally:
        r.end = time.monotonic() - t0
    return r


def run_phase(url: str, phase: Phase, model: str, seed: int, t0: float, timeout: float):
    bodies = request_bodies(phase, model, seed)
    with ThreadPoolExecutor(phase.concurrency) as pool:
        return list(pool.map(lambda b: stream_one(url, b, phase.name, t0, timeout), bodies))


def idle(watch, baseline: dict, most_s: float, hold_s: float) -> None:
    """Until every pool is back at its starting count and has stayed there hold_s, or most_s."""
    deadline = time.monotonic() + most_s
    settled = None
    while time.monotonic() < deadline:
        if watch.latest() == baseline:
            settled = settled or time.monotonic()
            if time.monotonic() - settled >= hold_s:
                return
        else:
            settled = None
        time.sleep(0.5)


def model_id(url: str) -> str:
    import requests

    return requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def run(args, url: str, watch) -> dict:
    model = args.model or model_id(url)
    t0 = watch.t0
    baseline = watch.latest()
    print(f"[bench autoscale] {url}, model {model}, replicas at start {baseline}", flush=True)
    spans: list[tuple] = []
    all_results: list[Result] = []
    for phase in phases(args):
        start = time.monotonic() - t0
        print(f"[bench autoscale] {phase.name}: {phase.num_requests} requests, "
              f"{phase.concurrency} at a time ...", flush=True)  # fmt: skip
        results = run_phase(url, phase, model, args.seed, t0, args.request_timeout)
        all_results += results
        spans.append((phase, phase.name, results, start, time.monotonic() - t0))
        start = time.monotonic() - t0
        idle(watch, baseline, args.idle_s, args.idle_hold_s)
        spans.append((None, f"idle after {phase.name}", [], start, time.monotonic() - t0))
    samples = watch.stop()
    summary = [summarize(*span, samples, baseline) for span in spans]
    for s in summary:
        print(_line(s), flush=True)
    return {
        "benchmark": "autoscale",
        "url": url,
        "model": model,
        "baseline_replicas": baseline,
        "replica_source": watch.source,
        "failed": sum(r.error is not None for r in all_results),
        "phases": summary,
        "samples": samples,
    }


def _line(s: dict) -> str:
    ms = lambda x: "-" if x is None else f"{1000 * x:.0f}"  # noqa: E731
    replicas = ", ".join(f"{p} {r['min']}-{r['max']}" for p, r in s["replicas"].items())
    return (
        f"{s['name']:>20}: {s['seconds']:6.1f} s, {s['requests']} requests, {s['failed']} failed, "
        f"TTFT p50/p90 {ms(s['ttft_s']['p50'])}/{ms(s['ttft_s']['p90'])} ms, "
        f"ITL p50/p90 {ms(s['itl_s']['p50'])}/{ms(s['itl_s']['p90'])} ms; replicas {replicas}"
    )


def markdown_table(report: dict) -> str:
    """The phases as the Markdown table docs/bench/autoscale.md shows: latencies in ms, and per
    pool its running replicas: when it first ran above its start, or, in a span that began
    above, when it was back (seconds into the span)."""
    pools = list(report["baseline_replicas"])
    ms = lambda x: "-" if x is None else f"{1000 * x:.0f}"  # noqa: E731
    sec = lambda x: f"{x:.0f}"  # noqa: E731
    head = ["span", "s", "requests", "failed", "TTFT p50 / p90 / mean ms",
            "ITL p50 / p90 / mean ms"]  # fmt: skip
    head += [f"{p} replicas" for p in pools]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in report["phases"]:
        cells = [s["name"], f"{s['seconds']:.0f}", str(s["requests"]), str(s["failed"])]
        for key in ("ttft_s", "itl_s"):
            v = s[key]
            cells.append(" / ".join(ms(v[k]) for k in ("p50", "p90", "mean")))
        for p in pools:
            r, base = s["replicas"][p], report["baseline_replicas"][p]
            if r["back_to_start_after_s"] is not None:
                cell = f"{r['max']} -> {base} at {sec(r['back_to_start_after_s'])} s"
            elif r["above_start_after_s"] is not None:
                cell = f"{base} -> {r['max']} at {sec(r['above_start_after_s'])} s"
            else:
                cell = f"{r['min']}-{r['max']}" if r["min"] != r["max"] else f"{r['min']}"
            cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen35-ray bench autoscale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="a running app")
    where.add_argument("--start-yaml", type=Path,
                       help="start a local Ray cluster, run this Serve config on it as `serve run`"
                       " does, bench it, and tear it down")  # fmt: skip
    p.add_argument("--ray-address", default=None,
                   help="with --url: the cluster to read serve.status() from (e.g. auto); "
                   "without it, replica counts come from the app's /metrics")  # fmt: skip
    p.add_argument("--num-cpus", type=float, default=2, help="with --start-yaml: the cluster's")
    p.add_argument(
        "--port", type=int, default=None, help="with --start-yaml: instead of its http_options.port"
    )
    p.add_argument("--app", default="qwen35", help="the Serve application's name")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--prefill-requests", type=int, default=64)
    p.add_argument("--prefill-concurrency", type=int, default=8)
    p.add_argument("--prefill-prompt-tokens", type=int, default=1500)
    p.add_argument("--decode-requests", type=int, default=48)
    p.add_argument("--decode-concurrency", type=int, default=16)
    p.add_argument("--decode-prompt-tokens", type=int, default=8)
    p.add_argument("--decode-max-tokens", type=int, default=200)
    p.add_argument(
        "--idle-s",
        type=float,
        default=120,
        help="longest idle span after a phase (it ends once the pools are back)",
    )
    p.add_argument(
        "--idle-hold-s",
        type=float,
        default=5,
        help="how long the pools must stay back at their start before the next phase",
    )
    p.add_argument("--sample-s", type=float, default=1.0, help="replica sampling period")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here, the plot beside it")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from qwen35_ray.bench.timing import machine_info, write_report
    from qwen35_ray.serving.autoscale_watch import (
        NoReplicaCounts,
        ReplicaWatch,
        connect,
        serve_yaml,
    )

    args = parser().parse_args(argv)
    # before the run: the commit measured is the one checked out when it started
    machine = machine_info("cpu")
    if args.out and not args.no_plot:
        from qwen35_ray.bench.autoscale_plot import require_matplotlib

        require_matplotlib()
    if args.start_yaml:
        cluster = serve_yaml(args.start_yaml, args.num_cpus, args.app, args.port)
    else:
        cluster = connect(args.url, args.ray_address)
    with cluster as (url, connected):
        try:
            watch = ReplicaWatch(url, args.app, connected, args.sample_s)
        except NoReplicaCounts as e:
            raise SystemExit(f"bench autoscale: {e}") from None
        try:
            report = run(args, url, watch)
        finally:
            watch.stop()
        report["decisions"] = watch.decision_log() if connected else []
    report["config"] = str(args.start_yaml) if args.start_yaml else None
    report["command"] = "qwen35-ray bench autoscale " + " ".join(argv or [])
    report["machine"] = machine
    write_report(args.out, report)
    print(markdown_table(report))
    if args.out and not args.no_plot:
        from qwen35_ray.bench.autoscale_plot import plot

        plot(report, args.out.with_suffix(".png"))
        print(f"[bench autoscale] wrote {args.out} and {args.out.with_suffix('.png')}")
    if report["failed"]:
        print(f"[bench autoscale] {report['failed']} requests FAILED", flush=True)
        return 1
    return 0
