"""The command line of `qwen35-ray bench serve` (its description: the doc of bench/serve.py)."""

import argparse
import json
import math
from pathlib import Path


def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen35-ray bench serve",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument(
        "--start-yaml",
        type=Path,
        help="start a local Ray cluster, run this Serve config on it as `serve run`"
        " does, bench it, and tear it down",
    )
    p.add_argument("--num-cpus", type=float, default=2, help="with --start-yaml: the cluster's")
    p.add_argument(
        "--port", type=int, default=None, help="with --start-yaml: instead of its http_options.port"
    )
    p.add_argument("--app", default=None, help="the Serve application (default: the first)")
    p.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions or /v1/chat/completions",
    )
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument(
        "--tokenizer", default=None, help="embedded name, directory or hub id (default: the model)"
    )
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    p.add_argument("--dataset", type=Path, default=None, help="a chat dataset (see above)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="dataset conversations whose prompt + output exceed it are skipped",
    )
    p.add_argument("--num-prompts", type=int, default=64, help="measured requests per run")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="default 128 for random prompts, the reply's length for a dataset",
    )
    p.add_argument(
        "--prompt-format",
        choices=["ids", "text"],
        default="ids",
        help="random prompts to /v1/completions as token ids or as text",
    )
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at EOS (default: ignore_eos, exact output lengths)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="-1: leave it to the server's default"
    )
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into bodies")
    p.add_argument(
        "--max-concurrency",
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="requests in flight at most; several values: one run each",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="arrivals per second (inf: all at once); several values: one run each",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the gaps between arrivals (1: Poisson)",
    )
    p.add_argument(
        "--num-warmups", type=int, default=1, help="requests sent and not counted before each run"
    )
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 (names ttft, tpot, e2el)",
    )
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument(
        "--offline",
        action="store_true",
        help="also run each run's requests through the engine in this process",
    )
    p.add_argument(
        "--engine-from",
        type=Path,
        default=None,
        help="with --offline: the Serve YAML whose engine settings it takes (default --start-yaml)",
    )
    p.add_argument(
        "--offline-pool",
        default=None,
        help="llm_server, prefill_server or decode_server (default: llm_server, "
        "decode_server for a disaggregated app)",
    )
    p.add_argument(
        "--offline-threads",
        type=int,
        default=None,
        help="torch threads of the offline engine (default: the pool's num_cpus, "
        "as Ray gives its replica)",
    )
    p.add_argument(
        "--compile-wait",
        type=float,
        default=600,
        help="with --start-yaml: seconds to wait for each served engine's compiled decode "
        "step (compile_decode auto compiles in the background) before the first run; 0: do "
        "not wait. The --offline engine is always waited for",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --start-yaml: py-spy record the engine replicas, the ingress and Serve's "
        "proxy during each run (raw stacks in DIR); each run keeps a summary (functions with "
        "most samples)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600,
        help="seconds without a byte from the server before a request fails",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="a name for the run, kept in the JSON")
    p.add_argument("--notes", default=None, help="free text kept in the JSON")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--plot",
        nargs="?",
        const=True,
        default=None,
        metavar="PNG",
        help="draw latency against load (default path: --out with .png)",
    )
    p.add_argument(
        "--save-detailed",
        action="store_true",
        help="keep per-request lists (ttfts, itls, ...) in each run, as vLLM's flag",
    )
    return p
