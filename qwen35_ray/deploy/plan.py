"""`qwen35-ray plan`: size a deployment from a model's config.json and the hardware, print the
memory arithmetic, and write the Serve YAML and the KubeRay RayService that match it.

    qwen35-ray plan --model Qwen/Qwen3.5-397B-A17B --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB

--model: a config.json, a directory holding one, or a hub id (only its config.json is fetched,
with huggingface_hub.hf_hub_download). Prints, per GPU: the weights at each expert-parallel size
(replicated + this rank's routed experts) and the room left for caches; KV bytes per token and
GDN state bytes per sequence with their formulas; the sequences that fit at --context; the bytes
a prefill->decode transfer carries per prompt length; the layout chosen, by the rule in
qwen35_ray/deploy/layout.py (the smallest EP holding --min-seqs sequences per GPU; replicas =
GPUs / EP; one replica collocated, more disaggregated 1 prefill : 3 decode at whole nodes).
Writes OUT/serve.yaml (`serve deploy`) and OUT/rayservice.yaml (`kubectl apply`). --json prints
the same figures as exact integers. Exit 2: the model does not fit, with the memory missing.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from qwen35_ray.deploy import layout as lo
from qwen35_ray.deploy import plan_report as text
from qwen35_ray.deploy.k8s_samples import CUDA_IMAGE, HF_SECRET, HUB_CACHE_PVC
from qwen35_ray.deploy.layout import Cluster, TooSmall
from qwen35_ray.deploy.rayservice import ClusterSpec, rayservice_yaml
from qwen35_ray.deploy.sizing import GiB, count_params
from qwen35_ray.engine.request_state import state_nbytes
from qwen35_ray.model.config import ModelConfig

MiB, KiB = 2**20, 2**10
HEAD_CPUS, HEAD_MEMORY = 8, "32Gi"
CONTEXTS = (8192, 32768, 131072, 262144)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,45}[a-z0-9])?")
LIMITS = {
    "nodes": 4096,
    "gpus_per_node": 64,
    "min_seqs": 4096,
    "cpus_per_gpu": 1024,
    "host_memory_per_gpu": 65536,
}
UNITS = {"gib": GiB, "gb": 10**9, "mib": MiB, "mb": 10**6, "tib": 2**40, "tb": 10**12}


def memory_bytes(text: str) -> int:
    """'80GiB' -> 80 x 2**30, '80GB' -> 80 x 10**9, '141' -> 141 GiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m and (m[2].lower() or "gib")
    if not m or unit not in UNITS or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a memory size; write e.g. 80GiB (2**30 B), 80GB (10**9 B) or 80 (GiB)"
        )
    return int(float(m[1]) * UNITS[unit])


def read_config(model: str) -> tuple[dict, Path, bool]:
    """(config, where it was read, fetched from the hub?)."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise SystemExit(f"error: --model {model}: the directory holds no config.json")
    elif not path.is_file():
        if not HUB_ID.match(model):
            raise SystemExit(f"error: --model {model}: no such file or directory, nor a hub id")
        from huggingface_hub import hf_hub_download

        print(f"fetching config.json of {model} from the hub", file=sys.stderr)
        path = Path(hf_hub_download(model, "config.json"))
    try:
        return json.loads(path.read_text()), path, not Path(model).expanduser().exists()
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --model {model}: {path} is not JSON ({e})") from None


def names(model: str, path: Path, hub: bool) -> tuple[str, str, str | None]:
    """(display name, what the Serve YAML's `model:` says, a note when it is inferred)."""
    if hub:
        return model.split("/")[-1], model, None
    given = Path(model).expanduser()
    if given.is_dir():
        return given.resolve().name, model, None
    if path.name == "config.json":
        return path.parent.resolve().name, str(given.parent), None
    stem = path.name.removesuffix(".json").removesuffix(".config")
    # a copy of a hub config named after its repository (shared/data/qwen35/configs)
    guess = f"Qwen/{stem}"
    return stem, guess, f"model: {guess}, inferred from the file name; set --serve-model"


def slug(name: str) -> str:
    """A DNS label (RayService metadata.name), at most 47 characters (KubeRay's limit)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:47].rstrip("-") or "qwen35"


def parse(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(
        prog="qwen35-ray plan", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    a.add_argument("--model", required=True, help="config.json, its directory, or a hub id")
    a.add_argument("--nodes", type=int, required=True)
    a.add_argument("--gpus-per-node", type=int, required=True)
    a.add_argument(
        "--gpu-memory", type=memory_bytes, required=True, help="per GPU: 80GiB, 80GB, 141 (GiB)"
    )
    a.add_argument("--context", type=int, default=32768, help="max_model_len (default 32768)")
    a.add_argument("--memory-utilization", type=float, default=0.9)
    a.add_argument("--reserve-gib", type=float, default=2.0, help="per GPU, for activations")
    a.add_argument(
        "--weights",
        choices=("bf16", "fp8"),
        default="bf16",
        help="bf16: this engine (it dequantises FP8 checkpoints on load); fp8: weights kept in "
        "FP8, for comparison only (no files written)",
    )
    a.add_argument(
        "--min-seqs",
        type=int,
        default=16,
        help="the smallest EP holding this many sequences per GPU at --context is chosen",
    )
    a.add_argument("--prefill-share", type=float, default=0.25, help="GPUs prefilling")
    a.add_argument("--no-prefix-caching", action="store_true", help="no GDN snapshot slots")
    a.add_argument("--prompt-lengths", type=int, nargs="+", default=[1024, 4096, 32768, 131072])
    a.add_argument("--cpus-per-gpu", type=int, default=8, help="CPUs of each rank (or replica)")
    a.add_argument("--host-memory-per-gpu", type=int, default=32, help="GiB of pod memory")
    a.add_argument(
        "--gpu-product", help="nodeSelector nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3"
    )
    a.add_argument("--out", type=Path, help="default: ./plan-<model>/")
    a.add_argument("--name", help="RayService name; default: from the model's")
    a.add_argument("--image", default=CUDA_IMAGE)
    a.add_argument("--serve-model", help="the Serve YAML's model: (default: as given)")
    a.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = a.parse_args(argv)
    for flag, most in LIMITS.items():
        if not 1 <= getattr(args, flag) <= most:
            a.error(f"--{flag.replace('_', '-')} must be between 1 and {most}")
    if args.name is not None and not DNS_LABEL.fullmatch(args.name):
        a.error(f"--name {args.name!r} must be lowercase letters, digits and '-', at most 47")
    if args.reserve_gib < 0:
        a.error("--reserve-gib must be >= 0")
    if not 0 < args.memory_utilization <= 1:
        a.error("--memory-utilization must be in (0, 1]")
    if not 0 < args.prefill_share < 1:
        a.error("--prefill-share must be between 0 and 1")
    if args.context < 16 or min(args.prompt_lengths) < 1:
        a.error("--context must be at least 16, and each of --prompt-lengths at least 1")
    return args


def figures(args, raw: dict, c: ModelConfig, cluster: Cluster) -> tuple[dict, lo.Layout | None]:
    """Every number the report prints, as exact integers (the --json output), and the layout
    (None: the model does not fit; the figures then hold the error)."""
    cost = lo.seq_cost(c, prefix_caching=not args.no_prefix_caching)
    rows = lo.ep_rows(c, cluster, cost, args.context)
    params = count_params(c, raw)
    contexts = sorted({*CONTEXTS, args.context})
    out = {
        "model": {
            "layers": c.num_hidden_layers,
            "gdn_layers": len(c.gdn_layers),
            "attention_layers": len(c.attention_layers),
            "moe_layers": sum(c.moe_layers),
            "num_experts": c.num_experts,
            "experts_per_token": c.num_experts_per_tok,
            "params_text_total": params["text_total"],
            "params_text_active": params["text_active"],
            "params_vision": params["vision"],
        },
        "cluster": vars(cluster) | {"gpus": cluster.gpus, "context": args.context},
        "ep_table": [vars(r) for r in rows],
        "kv_bytes_per_token": cost.kv_bytes_per_token,
        "gdn_conv_bytes_per_seq": cost.gdn_conv_bytes,
        "gdn_recurrent_bytes_per_seq": cost.gdn_recurrent_bytes,
        "gdn_state_bytes_per_seq": cost.gdn_state_bytes,
        "state_slots_per_seq": cost.slots_per_seq,
        "dims": {
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "conv_dim": c.conv_dim,
            "conv_kernel": c.linear_conv_kernel_dim,
            "value_heads": c.linear_num_value_heads,
            "key_head_dim": c.linear_key_head_dim,
            "value_head_dim": c.linear_value_head_dim,
        },
        "transfer": [
            {"prompt_tokens": n, "bytes": state_nbytes(c, lo.DTYPE, n)} for n in args.prompt_lengths
        ],
    }
    try:
        row, why = lo.choose_ep(rows, args.min_seqs, cost, args.context)
    except TooSmall as e:
        out["error"] = str(e)
        return out, None
    lay = lo.layout(cluster, row.ep, args.prefill_share)
    out["sequences"] = [
        {
            "context": n,
            "bytes_per_seq": cost.seq_bytes(n),
            "per_gpu": (k := cost.seqs(row.room_bytes, n)),
            "per_replica": k * row.ep,
            "cluster": k * cluster.gpus,
        }
        for n in contexts
        if n <= c.context_len
    ]
    out["layout"] = vars(lay) | {"why": why, "disaggregated": lay.disaggregated}
    out["engine"] = lo.engine_args(row, cost, args.context)
    return out, lay


def write(args, name: str, model: str, f: dict, lay: lo.Layout, cluster: Cluster) -> list[Path]:
    """OUT/serve.yaml and OUT/rayservice.yaml; the app's args checked with AppConfig first."""
    from qwen35_ray.serving.config import AppConfig

    app = lo.app_args(model, lay, f["engine"], args.cpus_per_gpu)
    AppConfig.model_validate(app)
    command = "qwen35-ray plan " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    about = text.about(name, f)
    serve = "".join(f"# {line}\n" for line in text.comment(about, command))
    serve += yaml.safe_dump(lo.serve_config(app, lay.disaggregated), sort_keys=False)
    groups = lo.worker_groups(
        cluster, lay, args.cpus_per_gpu, args.host_memory_per_gpu, args.gpu_product
    )
    spec = ClusterSpec(
        name=args.name or slug(name),
        image=args.image,
        head_cpus=HEAD_CPUS,
        head_memory=HEAD_MEMORY,
        workers=groups,
        hub_cache=HUB_CACHE_PVC,
        hf_token_secret=HF_SECRET,
        # the plan fixes the replicas, and so the pods: nothing for the autoscaler to do
        autoscaling=False,
    )
    needs = (
        f"Pods: {text.pods(groups)}. Needs the PVC {HUB_CACHE_PVC} (k8s/hub-cache-pvc.yaml) for "
        f"the hub cache and, for a gated checkpoint, the Secret {HF_SECRET} with key HF_TOKEN."
    )
    header = text.comment([about[0], needs], command)
    manifest = rayservice_yaml(serve, spec, header="\n".join(header))
    out = args.out or Path(f"plan-{slug(name)}")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "serve.yaml", out / "rayservice.yaml"]
    for path, content in zip(paths, (serve, manifest)):
        path.write_text(content)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.argv = argv
    raw, path, hub = read_config(args.model)
    print(f"read {path}", file=sys.stderr)
    try:
        c = ModelConfig.from_dict(raw)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a Qwen3.5 config ({e})") from None
    if args.context > c.context_len:
        raise SystemExit(
            f"error: --context {args.context} exceeds the model's {c.context_len}-token "
            f"context ({c.describe_context()}); lower --context"
        )
    name, model, note = names(args.model, path, hub)
    model = args.serve_model or model
    cluster = Cluster(
        args.nodes,
        args.gpus_per_node,
        args.gpu_memory,
        args.memory_utilization,
        args.reserve_gib,
        args.weights,
    )
    f, lay = figures(args, raw, c, cluster)
    printed = text.report(name, f)
    if lay is None:
        print(json.dumps(f, indent=2) if args.json else printed)
        print(f"error: {name} {f['error']}", file=sys.stderr)
        return 2
    if args.weights == "fp8":
        lines = [
            "FP8 weights: what an engine keeping them in FP8 needs. This engine dequantises "
            "FP8 checkpoints to bf16 on load, so no Serve YAML is written for this table."
        ]
        f["files"] = []
    else:
        f["files"] = [str(p) for p in write(args, name, model, f, lay, cluster)]
        lines = ([f"note: {note}"] if note and not args.serve_model else []) + [
            f"wrote {p}" for p in f["files"]
        ]
    print(json.dumps(f, indent=2) if args.json else "\n".join([printed, *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
