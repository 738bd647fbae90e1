"""`qwen35-ray bench serve`: load on any OpenAI-compatible server (ours, vLLM, SGLang), measured
from the client as `vllm bench serve` measures it, with its result names.

Workload: random prompts of exactly --input-len tokens of the model's tokenizer (sent to
/v1/completions as token ids; --prompt-format text sends text that re-tokenizes to that length)
and --output-len tokens out with ignore_eos; or conversations from --dataset FILE (JSON Lines or
a JSON array; ShareGPT {"conversations": [{"from", "value"}]} or {"messages": [{"role",
"content"}]}: the first user turn is the prompt, the reply after it sets the output length).
Every run of a sweep gets prompts of its own, so the prefix cache never serves one run from an
earlier one's; --num-warmups requests of their own go first and are not counted.

Our apps: --start-yaml deployments/qwen35.yaml benches the collocated app, --start-yaml
deployments/qwen35-pd.yaml the disaggregated one (a prefill and a decode pool; --offline then
takes the decode pool's engine settings, --offline-pool another's); --base-url an app already
running (serve run, qwen35-ray serve). With --start-yaml the bench waits for the engines'
compiled decode step, and records each run's engine steps (from /metrics), the CPU seconds of
every process of the cluster and, with --py-spy, a sampled profile of the engine replicas,
the ingress and Serve's proxy.

Load: --max-concurrency N... (closed loop, N in flight) and/or --request-rate R... (open loop,
Poisson arrivals, or gamma with --burstiness); each value, or pair of values, is one run.

Figures per run: request, output and total token throughput, TTFT, TPOT, ITL and end-to-end
latency (mean, median, std, percentiles), goodput under --goodput SLOs. --offline runs the same
requests through the engine in this process with a Serve YAML's engine settings, for the
serving/offline ratio. --out writes JSON (each of its `runs` keyed as vLLM's result file) and
--plot a PNG beside it.
"""

import asyncio
import contextlib
import math
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from qwen35_ray.bench import serve_profile, serve_report
from qwen35_ray.bench.serve_args import parser
from qwen35_ray.bench.serve_client import Endpoint, first_model, run_load, send, session
from qwen35_ray.bench.serve_data import ChatDataset, load_tokenizer, random_requests
from qwen35_ray.bench.serve_metrics import detailed, parse_goodput, summarize
from qwen35_ray.serving.serve_mode import started_env


def load_points(args) -> list[tuple[int | None, float]]:
    return [(c, r) for c in (args.max_concurrency or [None]) for r in args.request_rate]


class Workload:
    """The requests of each run and of its warm-up, none shared with another run."""

    def __init__(self, args, tok, route: str):
        self.args, self.tok, self.route = args, tok, route
        self.output_len = args.output_len
        self.inexact = 0
        self.dataset = None
        if args.dataset is not None:
            self.dataset = ChatDataset(
                args.dataset, tok, route, args.output_len, args.max_model_len, args.seed
            )
        elif self.output_len is None:
            self.output_len = 128

    def take(self, n: int, what: str):
        if self.dataset is not None:
            return self.dataset.take(n)
        a = self.args
        reqs, inexact = random_requests(
            self.tok,
            n,
            a.input_len,
            self.output_len,
            f"{a.seed}:{what}",
            self.route,
            a.prompt_format == "text",
        )
        self.inexact += inexact
        return reqs

    def describe(self) -> dict:
        a = self.args
        return {
            "dataset": str(a.dataset) if a.dataset else "random",
            "input_len": None if a.dataset else a.input_len,
            "output_len": self.output_len,
            "prompt_format": "messages"
            if self.route == "chat"
            else ("text" if a.dataset or a.prompt_format == "text" else "token_ids"),
            "prompts_not_exact_length": self.inexact,
            "prompts_reused_across_runs": bool(self.dataset and self.dataset.reused),
            "num_prompts": a.num_prompts,
            "num_warmups": a.num_warmups,
            "ignore_eos": a.ignore_eos,
            "temperature": None if a.temperature < 0 else a.temperature,
            "seed": a.seed,
        }


async def run(
    args, base_url: str, slo: dict, percentiles: list[float], app: str | None = None
) -> dict:
    """app: the Serve app of a cluster this process started and is connected to (--start-yaml),
    whose engines it waits for and whose processes it profiles; None for any other server."""
    model = args.model or await first_model(base_url, args.api_key)
    tokenizer_id = args.tokenizer or model
    print(f"[bench serve] {base_url}, model {model}, tokenizer {tokenizer_id}", flush=True)
    tok = load_tokenizer(tokenizer_id)
    workload = Workload(args, tok, args.endpoint)
    temperature = None if args.temperature < 0 else args.temperature
    ep = Endpoint(
        base_url, args.endpoint, model, args.api_key, args.ignore_eos, temperature, args.extra_body
    )
    offline = None
    if args.offline:
        from qwen35_ray.bench.serve_offline import OfflineEngine

        yaml_path = args.engine_from or args.start_yaml
        if yaml_path is None:
            raise SystemExit("bench serve: --offline needs --engine-from YAML (or --start-yaml)")
        offline = OfflineEngine(yaml_path, args.app, args.offline_pool, args.offline_threads)
        print(f"[bench serve] offline engine: {offline.settings}", flush=True)

    compiled = None
    if app is not None and args.compile_wait > 0:
        print("[bench serve] waiting for the served engines' compiled decode step", flush=True)
        from qwen35_ray.serving.warmup import wait_compiled

        compiled = await wait_compiled(app, args.compile_wait)
        print(f"[bench serve] compiled: {compiled}", flush=True)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    cpu = serve_profile.ClusterCPU() if app is not None else None
    metrics_url = base_url.rstrip("/") + "/metrics"
    runs = []
    async with session(args.request_timeout) as http:
        served = lambda r: send(http, ep, r, count)  # noqa: E731
        for k, (conc, rate) in enumerate(load_points(args)):
            warm = workload.take(args.num_warmups, f"warmup:{k}") if args.num_warmups else []
            reqs = workload.take(args.num_prompts, f"run:{k}")
            arrivals = f"{args.seed}:arrivals:{k}"
            if warm:
                await run_load(served, warm, conc)
            steps0 = await serve_profile.engine_steps(http, metrics_url)
            cpu0 = cpu.sample() if cpu is not None else None
            spy = contextlib.nullcontext()
            if args.py_spy is not None and cpu is not None:
                tag = f"{args.label or 'serve'}-c{conc}-r{rate:g}"
                spy = serve_profile.PySpy(args.py_spy, spied(cpu.pids()), tag)
            with spy:
                records, duration = await run_load(
                    served, reqs, conc, rate, args.burstiness, arrivals
                )
            cpu1 = cpu.sample() if cpu is not None else None
            steps1 = await serve_profile.engine_steps(http, metrics_url)
            row = {
                "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
                "endpoint_type": "openai-chat" if args.endpoint == "chat" else "openai",
                "backend": "openai-chat" if args.endpoint == "chat" else "openai",
                "label": args.label,
                "model_id": model,
                "tokenizer_id": tokenizer_id,
                "num_prompts": len(reqs),
                "request_rate": "inf" if math.isinf(rate) else rate,
                "burstiness": args.burstiness,
                "max_concurrency": conc,
                **summarize(records, duration, percentiles, slo),
                "output_tokens_source": sorted(
                    {r.output_tokens_source for r in records if r.success}
                ),
                "error_samples": sorted({r.error for r in records if not r.success})[:5],
            }
            if args.save_detailed:
                row.update(detailed(records))
            row["engine_steps"] = serve_profile.steps_between(steps0, steps1, duration)
            if cpu is not None:
                row["cpu_seconds"] = serve_profile.ClusterCPU.between(cpu0, cpu1)
                row["cpu_wait_seconds"] = serve_profile.ClusterCPU.between(cpu0, cpu1, 2)
            if isinstance(spy, serve_profile.PySpy):
                row["py_spy"] = spy.summary
            if offline is not None:
                offline_send = lambda r: offline.send(r, temperature, args.ignore_eos)  # noqa: E731
                if warm:
                    await run_load(offline_send, warm, conc)
                before, t0, w0 = offline.stats(), os.times(), serve_profile.runqueue_s(os.getpid())
                recs, secs = await run_load(
                    offline_send, reqs, conc, rate, args.burstiness, arrivals
                )
                after, t1, w1 = offline.stats(), os.times(), serve_profile.runqueue_s(os.getpid())
                row["offline"] = summarize(recs, secs, percentiles, slo)
                d = {
                    k: b - a
                    for (k, a), b in zip(
                        serve_profile.engine_counters(before).items(),
                        serve_profile.engine_counters(after).values(),
                    )
                }
                row["offline"]["engine_steps"] = serve_profile.step_summary(d, secs)
                row["offline"]["cpu_seconds"] = round(
                    (t1.user + t1.system) - (t0.user + t0.system), 2
                )
                row["offline"]["cpu_wait_seconds"] = round(w1 - w0, 2)
                row["serving_offline_output_throughput_ratio"] = (
                    row["output_throughput"] / row["offline"]["output_throughput"]
                    if row["offline"]["output_throughput"]
                    else None
                )
            runs.append(row)
            print("[bench serve] " + serve_report.line(row), flush=True)
    return {
        "benchmark": "serve",
        "base_url": base_url,
        "endpoint": ep.url.removeprefix(base_url.rstrip("/")),
        "model_id": model,
        "tokenizer_id": tokenizer_id,
        "workload": workload.describe(),
        "burstiness": args.burstiness,
        "goodput_slo_ms": slo or None,
        "metric_percentiles": percentiles,
        "offline": offline.settings if offline else None,
        "served_decode_compiled": compiled,
        "failed": sum(r["failed"] for r in runs),
        "runs": runs,
    }


def spied(pids: dict[int, str]) -> dict[int, str]:
    """The processes --py-spy records: the engine replicas, the ingress and the proxy."""
    keep = ("Server", "Ingress", "ProxyActor")
    return {pid: name for pid, name in pids.items() if any(k in name for k in keep)}


def worktree_changes() -> list[str] | None:
    """Tracked files under the code folders that differ from the commit: what ran besides it
    (None outside a git clone)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "qwen35_ray", "kernels"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [line[3:] for line in out.stdout.splitlines()]


def main(argv: list[str] | None = None) -> int:
    from qwen35_ray.bench.timing import machine_info, write_report

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(__doc__).parse_args(argv)
    try:
        slo = parse_goodput(args.goodput)
        percentiles = [float(q) for q in args.metric_percentiles.split(",")]
    except ValueError as e:
        raise SystemExit(f"bench serve: {e}") from None
    if args.num_prompts < 1 or any(c < 1 for c in args.max_concurrency or []):
        raise SystemExit("bench serve: --num-prompts and --max-concurrency must be >= 1")
    plot_path = None
    if args.plot:
        if args.plot is True and args.out is None:
            raise SystemExit("bench serve: --plot without a path needs --out")
        plot_path = args.out.with_suffix(".png") if args.plot is True else Path(args.plot)
        serve_report.require_matplotlib()
    # before the run: the commit measured is the one checked out when it started
    machine = machine_info("cpu")
    changes = worktree_changes()
    if args.start_yaml:
        from qwen35_ray.bench.serve_offline import app_name
        from qwen35_ray.serving.autoscale_watch import serve_yaml

        app = app_name(args.start_yaml, args.app)
        cluster = serve_yaml(args.start_yaml, args.num_cpus, app, args.port)
    else:
        app = None
        cluster = contextlib.nullcontext((args.base_url.rstrip("/"), False))
    with cluster as (url, started):
        report = asyncio.run(run(args, url, slo, percentiles, app if started else None))
    report.update(
        config=str(args.start_yaml) if args.start_yaml else None,
        # the Serve mode of the cluster it started (serving/serve_mode.py)
        serve_env=started_env() if args.start_yaml else None,
        label=args.label,
        notes=args.notes,
        command="qwen35-ray bench serve " + shlex.join(argv),
        machine=machine,
        worktree_changes=changes,
    )
    print(serve_report.markdown_table(report), flush=True)
    write_report(args.out, report)
    if args.out:
        print(f"[bench serve] wrote {args.out}", flush=True)
    if plot_path is not None:
        serve_report.plot(report, plot_path)
        print(f"[bench serve] wrote {plot_path}", flush=True)
    if report["failed"]:
        print(f"[bench serve] {report['failed']} requests FAILED", flush=True)
        return 1
    return 0
