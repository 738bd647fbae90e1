"""The flags of `qwen35-ray serve`: vLLM's and SGLang's spellings, and ours.

Only parsing lives here (types, aliases, help); what each flag means for the app config, and
the refusals with their reasons, are in serve_flags.py.
"""

import argparse
import re

# vLLM reads its key from here when --api-key is not given; so do we
VLLM_API_KEY_ENV = "VLLM_API_KEY"
BYTE_UNITS = {"": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


class ServeFlagError(ValueError):
    """A command line qwen35-ray serve cannot honour; the message names the flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ServeFlagError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]iB)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte count: an integer or a number with KiB, MiB, GiB or TiB"
        )
    value = int(float(m.group(1)) * BYTE_UNITS[m.group(2) or ""])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qwen35-ray serve",
        allow_abbrev=False,
        description="Serve MODEL with an OpenAI-compatible API on Ray Serve, from vLLM's or "
        "SGLang's flags. `--print-config` prints the equivalent Serve YAML instead.",
        epilog="Accepted because that is what qwen35-ray does anyway: --reasoning-parser "
        "qwen3, --tool-call-parser qwen3_coder, --enable-auto-tool-choice (tool calls are always "
        "parsed), --trust-remote-code (no checkpoint code is ever run: the model is our own), "
        "--enable-metrics (/metrics is always on), --enforce-eager (no CUDA graphs), "
        "--generation-config auto (the model's generation_config.json gives the defaults).",
    )
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="embedded name, dir or hub id")
    m = p.add_argument_group("model and engine (vLLM / SGLang names)")
    m.add_argument("--model", "--model-path", dest="model_opt", metavar="MODEL")
    m.add_argument("--served-model-name", nargs="+", metavar="NAME")
    m.add_argument("--dtype", default=None, help="auto, float32 (float) or bfloat16")
    m.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: cuda if this machine sees a GPU, else cpu",
    )
    m.add_argument(
        "--kernels",
        choices=["auto", "torch", "triton"],
        default=None,
        help="the model's ops: auto (Triton kernels on cuda, PyTorch paths on cpu), torch (the "
        "PyTorch paths, a reference on cuda), triton (on cpu only under TRITON_INTERPRET=1)",
    )
    m.add_argument("--max-model-len", "--context-length", type=_positive_int)
    m.add_argument(
        "--max-num-seqs",
        "--max-running-requests",
        type=_positive_int,
        help="sequences running at once per rank (GDN state slots)",
    )
    m.add_argument("--max-num-batched-tokens", type=_positive_int, help="token budget of a step")
    m.add_argument("--block-size", type=_positive_int, help="tokens per KV block")
    m.add_argument(
        "--kv-cache-memory-bytes",
        type=_bytes,
        metavar="BYTES",
        help="KV cache per rank: an integer or e.g. 20GiB",
    )
    m.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument(
        "--disable-radix-cache", action="store_true", help="SGLang's --no-enable-prefix-caching"
    )
    m.add_argument(
        "--tensor-parallel-size",
        "-tp",
        "--tp-size",
        "--tp",
        type=_positive_int,
        dest="tp",
        help="ranks, only with --enable-expert-parallel / --ep-size",
    )
    m.add_argument(
        "--data-parallel-size",
        "-dp",
        type=_positive_int,
        dest="dp",
        help="ranks (times -tp), only with --enable-expert-parallel",
    )
    m.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="-tp x -dp ranks per replica, experts split over them",
    )
    m.add_argument(
        "--expert-parallel-size",
        "--ep-size",
        "--ep",
        type=_positive_int,
        dest="ep",
        help="rank actors per replica (experts split over them)",
    )
    m.add_argument("--reasoning-parser", help="qwen3 (the only one: <think> ... </think>)")
    m.add_argument("--tool-call-parser", help="qwen3_coder (the only one)")
    m.add_argument("--enable-auto-tool-choice", action="store_true", help="always on")
    m.add_argument("--trust-remote-code", action="store_true", help="no-op: no remote code runs")
    m.add_argument("--enable-metrics", action="store_true", help="no-op: /metrics is always on")
    m.add_argument("--enforce-eager", action="store_true", help="no-op: no CUDA graphs")
    m.add_argument("--generation-config", help="auto (the model's generation_config.json)")
    d = p.add_argument_group(
        "speculative decoding with the checkpoint's MTP head, one chain of 1 to 4 drafts a step "
        "(docs/mtp.md); expert_parallel_size 1 only"
    )
    d.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='vLLM\'s: \'{"method": "qwen3_next_mtp", "num_speculative_tokens": K}\' (method '
        "mtp, qwen3_next_mtp, qwen3_5_mtp or nextn)",
    )
    d.add_argument(
        "--speculative-algorithm",
        "--speculative-algo",
        dest="spec_algo",
        metavar="NEXTN",
        help="SGLang's: NEXTN (or MTP), with --speculative-num-steps K",
    )
    d.add_argument(
        "--speculative-num-steps",
        dest="spec_steps",
        type=_positive_int,
        metavar="K",
        help="drafts verified per step",
    )
    d.add_argument(
        "--speculative-eagle-topk",
        dest="spec_topk",
        type=_positive_int,
        metavar="N",
        help="1 only (a chain, not a tree)",
    )
    d.add_argument(
        "--speculative-num-draft-tokens",
        dest="spec_draft_tokens",
        type=_positive_int,
        metavar="N",
        help="K + 1 only",
    )
    r = p.add_argument_group("refused, each with the reason and what to use instead")
    r.add_argument(
        "--gpu-memory-utilization",
        "--mem-fraction-static",
        dest="mem_fraction",
        metavar="FRACTION",
        help="use --kv-cache-memory-bytes",
    )
    r.add_argument("--seed", help="seed requests instead (the request body's `seed`)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0", help="default 0.0.0.0 (every interface)")
    s.add_argument("--port", type=int, default=8000, help="default 8000")
    s.add_argument("--api-key", help=f"Bearer key required on /v1 (also ${VLLM_API_KEY_ENV})")
    s.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="the key is in this environment variable (of every node)",
    )
    s.add_argument("--api-key-file", metavar="PATH", help="the key is in this file")
    s.add_argument("--num-replicas", type=_positive_int, help="engine replicas (collocated)")
    s.add_argument(
        "--disaggregate",
        action="store_true",
        help="a prefill pool and a decode pool (build_pd_app)",
    )
    s.add_argument("--prefill-replicas", type=_positive_int)
    s.add_argument("--decode-replicas", type=_positive_int)
    s.add_argument(
        "--num-cpus",
        type=_non_negative,
        help="CPUs each engine replica reserves (default 1); with EP, each rank (its torch "
        "threads)",
    )
    s.add_argument(
        "--num-gpus",
        type=_non_negative,
        help="GPUs of each engine replica, or of each rank with EP (cuda: 1)",
    )
    s.add_argument("--address", help="a running Ray cluster to serve on; default: a new local one")
    s.add_argument("--app-name", default="qwen35", help="the Serve application's name")
    s.add_argument("--route-prefix", default="/", help="where the app is mounted (/ -> /v1)")
    s.add_argument(
        "--print-config",
        action="store_true",
        help="print the equivalent Serve YAML and exit; starts nothing",
    )
    return p


def normalise(argv: list[str]) -> list[str]:
    """vLLM also takes --max_model_len for --max-model-len."""
    out = []
    for tok in argv:
        if tok.startswith("--"):
            name, sep, value = tok.partition("=")
            tok = name.replace("_", "-") + sep + value
        out.append(tok)
    return out


# flags parsed only to refuse them with a reason
REFUSED = ("mem_fraction", "seed")


def supported_flags(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Every flag spelling honoured or accepted (the refused ones left out)."""
    parser = parser or build_parser()
    return [
        s
        for act in parser._actions
        if act.dest not in (*REFUSED, "help")
        for s in act.option_strings
    ]
