"""`qwen35-ray serve MODEL [flags]`: a vLLM or SGLang command line -> the Serve config it means.

Pure translation, no Ray: the flags become the same validated `args` (AppConfig) a Serve YAML
carries, under one application naming qwen35_ray.serving.builder:build_app (build_pd_app with
--disaggregate). `--print-config` prints that config as YAML; otherwise main() hands it to the
runner (qwen35_ray/serving/launch.py), which starts or joins Ray and serves it.

A flag is either honoured, accepted because it asks for what we do anyway (said in --help), or
refused with the reason and the setting to use instead; a flag we do not know is an error naming
it. Nothing is dropped silently.

Ranks: we have no tensor parallelism. A replica is one expert-parallel group of N rank actors
(data-parallel attention, experts split over the ranks). `--tensor-parallel-size N` (vLLM) or
`--tp-size N` (SGLang) asks for a model spread over N GPUs; the nearest thing here is N such
ranks, so that is what it gives, saying so on stderr and in --print-config's header (the seed
command lines of Qwen's guides then run unchanged). With `--enable-expert-parallel` it counts
tp x dp ranks, as vLLM does.
"""

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass, field

import pydantic
import yaml

from qwen35_ray.deploy.serve_parser import (
    VLLM_API_KEY_ENV,
    ServeFlagError,
    build_parser,
    normalise,
    supported_flags,
)
from qwen35_ray.deploy.serve_speculative import speculative_flags
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.serve_mode import shell_prefix

BUILDERS = "qwen35_ray.serving.builder"
# the environment variable carrying --api-key to the ingress, so the key stays out of the
# app's args (Ray's dashboard shows them) and out of --print-config
API_KEY_ENV = "QWEN35_RAY_API_KEY"
MEMORY_FRACTION_REFUSAL = (
    "{flag} is refused: qwen35-ray sizes its caches in bytes, not as a share of GPU memory; "
    "pass --kv-cache-memory-bytes (e.g. 20GiB), and see `qwen35-ray plan` for the bytes that "
    "fit a GPU next to the weights"
)


@dataclass(frozen=True)
class ServeCommand:
    """What `qwen35-ray serve` was asked: the Serve config plus what stays outside it."""

    config: dict  # a Serve config file's contents (ServeDeploySchema)
    address: str | None  # None: start a local Ray
    argv: list[str]  # the command line, key redacted
    print_config: bool = False
    # the --api-key value, delivered in the environment variable api_key_env names
    api_key: str | None = field(default=None, repr=False)
    # how a flag was read where its meaning here differs from vLLM's / SGLang's
    notes: tuple[str, ...] = ()

    @property
    def app(self) -> dict:
        return self.config["applications"][0]

    @property
    def args(self) -> dict:
        return self.app["args"]

    @property
    def builder(self) -> str:
        return self.app["import_path"].rpartition(":")[2]

    @property
    def model_name(self) -> str:
        return AppConfig.model_validate(self.args).model_name

    def to_yaml(self) -> str:
        reserved = cpus_reserved(self.args, self.builder)
        head = [
            "# Written by: " + shlex.join(["qwen35-ray", "serve", *self.argv]),
            "# Run it with `serve run FILE`, or use it as a RayService's serveConfigV2; for",
            "# the speed `qwen35-ray serve` gives, in Serve's high-throughput mode:",
            f"#   {shell_prefix()} serve run FILE",
            # `qwen35-ray serve` gives its own Ray that many logical CPUs; `serve run` gives the
            # machine's, and a replica that does not fit waits for a node that never comes
            f"# Its replicas reserve {reserved:g} CPUs; on a machine with fewer, start Ray first "
            f"(ray start --head --num-cpus {math.ceil(reserved)}) and "
            "run `serve run --address auto FILE`.",
        ]
        head += [f"# Note: {n}" for n in self.notes]
        env = self.args.get("api_key_env")
        if env:
            head.append(
                f"# The API key is not in this file: set {env} in the environment where Serve "
                "runs (every node of a cluster), or use api_key_file."
            )
        return "\n".join(head) + "\n" + yaml.safe_dump(self.config, sort_keys=False)


def _redacted(argv: list[str]) -> list[str]:
    out, hide = [], False
    for tok in argv:
        if hide:
            out.append("***")
        elif tok.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(tok)
        hide = tok == "--api-key"
    return out


def _refusals(a: argparse.Namespace) -> list[str]:
    errors = []
    if a.dtype is not None and a.dtype not in ("auto", "float32", "float", "bfloat16"):
        if a.dtype in ("half", "float16", "fp16"):
            errors.append(
                f"--dtype {a.dtype} is refused: qwen35-ray runs the model in bfloat16 or "
                "float32 only; pass --dtype bfloat16 (the same memory as float16)"
            )
        else:
            errors.append(f"--dtype {a.dtype} is not one of auto, float32, bfloat16")
    if a.mem_fraction is not None:
        sglang = "--mem-fraction-static" in a.given
        flag = "--mem-fraction-static" if sglang else "--gpu-memory-utilization"
        errors.append(MEMORY_FRACTION_REFUSAL.format(flag=flag))
    if a.seed is not None:
        errors.append(
            "--seed is refused: the engine has no global seed; every request without a `seed` "
            "gets a random one, so pass `seed` in the request body for reproducible sampling"
        )
    if a.reasoning_parser is not None and a.reasoning_parser != "qwen3":
        errors.append(
            f"--reasoning-parser {a.reasoning_parser} is not supported: Qwen3.5's "
            "<think> ... </think> is parsed as qwen3 (pass --reasoning-parser qwen3 or omit it)"
        )
    if a.tool_call_parser is not None and a.tool_call_parser != "qwen3_coder":
        errors.append(
            f"--tool-call-parser {a.tool_call_parser} is not supported: Qwen3.5's tool calls "
            "are qwen3_coder XML (pass --tool-call-parser qwen3_coder or omit it)"
        )
    if a.generation_config not in (None, "auto"):
        errors.append(
            f"--generation-config {a.generation_config} is not supported: sampling defaults "
            "always come from the model's own generation_config.json (auto)"
        )
    if a.served_model_name and len(a.served_model_name) > 1:
        errors.append("--served-model-name takes one name here; several are not supported")
    return errors


def _ranks(a: argparse.Namespace, notes: list[str]) -> int:
    tp, dp = a.tp or 1, a.dp or 1
    if a.enable_expert_parallel:
        if a.ep is not None and a.ep != tp * dp:
            raise ServeFlagError(
                f"--expert-parallel-size {a.ep} disagrees with --enable-expert-parallel over "
                f"-tp {tp} x -dp {dp} = {tp * dp} ranks; give one of them"
            )
        return tp * dp
    if a.ep is not None:
        if tp not in (1, a.ep) or dp != 1:
            raise ServeFlagError(
                f"--ep-size {a.ep} with --tp-size {tp} / -dp {dp}: a replica is one group of "
                f"{a.ep} ranks, each running its own sequences and 1/{a.ep} of the experts; "
                f"give --tp-size {a.ep} or leave it out"
            )
        return a.ep
    if tp > 1 and dp == 1:
        notes.append(
            f"tensor parallel size {tp} runs as {tp} expert-parallel ranks per replica: "
            f"qwen35-ray has no tensor parallelism; each rank holds 1/{tp} of the routed experts "
            "and all other weights, and runs its own sequences (--ep-size "
            f"{tp} says the same)"
        )
        return tp
    if tp > 1:
        raise ServeFlagError(
            f"--tensor-parallel-size {tp} with --data-parallel-size {dp}: without "
            f"--enable-expert-parallel, give --ep-size {tp} and --num-replicas {dp}"
        )
    if dp > 1:
        raise ServeFlagError(
            f"--data-parallel-size {dp} without --enable-expert-parallel: for {dp} independent "
            f"engines pass --num-replicas {dp}"
        )
    return 1


def _model(a: argparse.Namespace) -> str:
    given = {m for m in (a.model_pos, a.model_opt) if m}
    if not given:
        raise ServeFlagError("no model: give MODEL (qwen35-ray serve qwen35-tiny ...)")
    if len(given) > 1:
        raise ServeFlagError(f"two models given: {a.model_pos!r} and --model {a.model_opt!r}")
    (model,) = given
    # a checkpoint directory given relative to here must mean the same to the replicas
    return os.path.abspath(model) if os.path.isdir(model) else model


def _pools(a: argparse.Namespace, device: str, ranks: int, engine: dict) -> dict:
    gpus = a.num_gpus if a.num_gpus is not None else (1.0 if device == "cuda" else 0.0)
    if gpus > 0 and device != "cuda":
        raise ServeFlagError(f"--num-gpus {a.num_gpus:g} needs --device cuda")
    pool: dict = {}
    if ranks > 1:
        # the ranks hold the model: GPUs and --num-cpus go to each rank, and the replica, which
        # runs the ranks' schedulers, keeps its default CPU
        if gpus:
            engine["rank_num_gpus"] = gpus
        if a.num_cpus is not None:
            engine["rank_num_cpus"] = a.num_cpus
    else:
        if gpus:
            pool["num_gpus"] = gpus
        if a.num_cpus is not None:
            pool["num_cpus"] = a.num_cpus
    if not a.disaggregate:
        for flag in ("prefill_replicas", "decode_replicas"):
            if getattr(a, flag) is not None:
                raise ServeFlagError(f"--{flag.replace('_', '-')} needs --disaggregate")
        return {"llm_server": {"num_replicas": a.num_replicas or 1, **pool}}
    if a.num_replicas is not None:
        raise ServeFlagError(
            "--num-replicas is for the collocated app; with --disaggregate give "
            "--prefill-replicas and --decode-replicas"
        )
    return {
        "prefill_server": {"num_replicas": a.prefill_replicas or 1, **pool},
        "decode_server": {"num_replicas": a.decode_replicas or 1, **pool},
    }


def _api_key(a: argparse.Namespace, environ) -> tuple[dict, str | None]:
    """(args entries, the key to deliver through API_KEY_ENV)."""
    given = [f for f in ("api_key", "api_key_env", "api_key_file") if getattr(a, f)]
    if len(given) > 1:
        raise ServeFlagError(f"give one of {', '.join('--' + g.replace('_', '-') for g in given)}")
    if a.api_key:
        return {"api_key_env": API_KEY_ENV}, a.api_key
    if a.api_key_env:
        return {"api_key_env": a.api_key_env}, None
    if a.api_key_file:
        return {"api_key_file": os.path.abspath(a.api_key_file)}, None
    if environ.get(VLLM_API_KEY_ENV):
        return {"api_key_env": VLLM_API_KEY_ENV}, None
    return {}, None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def translate(argv: list[str], *, cuda_available=_has_cuda, environ=None) -> ServeCommand:
    """The Serve config `qwen35-ray serve ARGV` runs. Raises ServeFlagError naming the flag."""
    environ = os.environ if environ is None else environ
    argv = normalise(list(argv))
    parser = build_parser()
    a, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = sorted({u.partition("=")[0] for u in unknown if u.startswith("-")})
        if flags:
            raise ServeFlagError(
                f"unsupported flag{'s' if len(flags) > 1 else ''} {', '.join(flags)} "
                f"(qwen35-ray serve takes: {', '.join(supported_flags(parser))})"
            )
        raise ServeFlagError(f"unexpected argument {unknown[0]!r} (one MODEL only)")
    a.given = {t.partition("=")[0] for t in argv if t.startswith("-")}
    errors, notes = _refusals(a), []
    try:
        ranks = _ranks(a, notes)
    except ServeFlagError as e:
        errors.append(str(e))
        ranks = 1
    spec, spec_errors = speculative_flags(a, ranks)
    errors += spec_errors
    if errors:
        raise ServeFlagError("\n".join(errors))
    device = a.device if a.device != "auto" else ("cuda" if cuda_available() else "cpu")
    engine = {
        k: v
        for k in (
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "kv_cache_memory_bytes",
            "enable_prefix_caching",
            "kernels",
        )
        if (v := getattr(a, k)) is not None
    }
    if a.disable_radix_cache:
        if a.enable_prefix_caching:
            raise ServeFlagError("--disable-radix-cache contradicts --enable-prefix-caching")
        engine["enable_prefix_caching"] = False
    if spec is not None:
        engine["speculative"] = spec
    if ranks > 1:
        engine["expert_parallel_size"] = ranks
    args: dict = {"model": _model(a)}
    if a.served_model_name:
        args["served_model_name"] = a.served_model_name[0]
    if a.dtype is not None:
        args["dtype"] = "float32" if a.dtype == "float" else a.dtype
    args["device"] = device
    pools = _pools(a, device, ranks, engine)
    if engine:
        args["engine"] = engine
    args.update(pools)
    key_args, key = _api_key(a, environ)
    args.update(key_args)
    try:
        AppConfig.model_validate(args)
    except pydantic.ValidationError as e:
        lines = [f"  {'.'.join(map(str, x['loc'])) or 'args'}: {x['msg']}" for x in e.errors()]
        raise ServeFlagError(
            "these flags give an invalid app config:\n" + "\n".join(lines)
        ) from None
    if not 0 < a.port < 65536:
        raise ServeFlagError(f"--port {a.port} is not a TCP port (1-65535)")
    builder = "build_pd_app" if a.disaggregate else "build_app"
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": a.host, "port": a.port},
        "applications": [
            {
                "name": a.app_name,
                "route_prefix": a.route_prefix,
                "import_path": f"{BUILDERS}:{builder}",
                "args": args,
            }
        ],
    }
    return ServeCommand(config, a.address, _redacted(argv), a.print_config, key, tuple(notes))


def cpus_reserved(args: dict, builder: str) -> float:
    """CPUs the app's replicas and ranks reserve: what a local Ray must offer to place them."""
    cfg = AppConfig.model_validate(args)
    pools = ("llm_server",) if builder == "build_app" else ("prefill_server", "decode_server")
    total = cfg.ingress.num_cpus * (cfg.ingress.num_replicas or 1)
    for pool in pools:
        e, dep = cfg.engine_for(pool), getattr(cfg, pool)
        ranks = e.expert_parallel_size * e.rank_num_cpus if e.expert_parallel_size > 1 else 0
        total += (dep.num_cpus + ranks) * (dep.num_replicas or 1)
    return total


def local_num_cpus(cmd: ServeCommand) -> int:
    """Logical CPUs for a local Ray: the machine's, or what the app reserves if more (replicas
    then share cores rather than wait for CPUs that never come)."""
    return max(os.cpu_count() or 1, math.ceil(cpus_reserved(cmd.args, cmd.builder)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = translate(argv)
    except ServeFlagError as e:
        print(f"qwen35-ray serve: error: {e}", file=sys.stderr)
        return 2
    for note in cmd.notes:
        print(f"qwen35-ray serve: note: {note}", file=sys.stderr)
    if cmd.print_config:
        sys.stdout.write(cmd.to_yaml())
        return 0
    from qwen35_ray.serving.launch import run

    return run(cmd, num_cpus=local_num_cpus(cmd))


if __name__ == "__main__":
    sys.exit(main())
