"""Memory and all-to-all arithmetic of an expert-parallel deployment, from a model's config.json.

    python scripts/parallelism_arithmetic.py --config PATH/config.json \
        --nodes 2 --gpus-per-node 8 --ep 16 [--weights fp8] [--json]

The arithmetic is qwen35_ray/deploy/sizing.py; this prints it as the tables of
docs/parallelism.md. Units: GiB/MiB/KiB (2**30, 2**20, 2**10 B) for memory; MB (1e6 B) for
transfers; GB/s (1e9 B/s) for bandwidths.
"""

import argparse
import json
import re
import textwrap
from dataclasses import asdict, fields
from pathlib import Path

from qwen35_ray.deploy.sizing import GiB, Hardware, plan

MiB, KiB = 2**20, 2**10
LABELS = {
    "embed_and_lm_head": "embedding and lm_head",
    "gdn_layers": "GDN layers",
    "router_shared_expert_dense_mlp": "router, shared expert (or dense MLP)",
    "mtp_total": "MTP head",
}
HELP = {
    "ep": "expert_parallel_size: ranks in the group",
    "memory_utilization": "share of GPU memory for weights, caches and the reserve",
    "reserve_gib": "kept for activations, all-to-all buffers, CUDA graphs",
    "kv_dtype_bytes": "KV cache and GDN conv state",
    "a2a_dtype_bytes": "bytes of a hidden vector's element on the wire",
    "nvlink_gbps": "GB/s per GPU, both directions summed (H100 SXM: 900)",
    "ib_gbit": "Gb/s of each GPU's NIC, each way",
    "batches": "decoding sequences on each rank",
    "contexts": "context lengths for the sequences-that-fit table",
}


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the first column left-aligned (names), the others right (numbers)."""
    cells = [header] + [[str(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    just = [str.ljust] + [str.rjust] * (len(widths) - 1)
    rule = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    lines = ["| " + " | ".join(j(x, w) for j, x, w in zip(just, r, widths)) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "|".join(rule) + "|", *lines[1:]])


def wrap(blocks: list[str]) -> str:
    """Prose wrapped to 100 columns; tables left whole."""
    return "\n".join(b if b.startswith("|") else textwrap.fill(b, 100) for b in blocks)


def advertised(path: str, flag: str | None) -> tuple[float, float] | None:
    """(total, active) parameters from `--advertised 397B-A17B`, else from a hub name such as
    Qwen3.5-397B-A17B in the config's path."""
    for text in [flag] if flag else reversed(Path(path).resolve().parts):
        found = re.search(r"(\d+(?:\.\d+)?)B-A(\d+(?:\.\d+)?)B", text)
        if found:
            return float(found[1]) * 1e9, float(found[2]) * 1e9
    if flag:
        raise SystemExit(f"--advertised {flag!r} is not like 397B-A17B (total B, active B)")
    return None


def report(p: dict) -> str:
    hw, m, par, g, cache = p["hardware"], p["model"], p["params"], p["per_gpu"], p["cache"]
    out = [
        f"# {Path(p['config']).name}: {hw['nodes']} node(s) x {hw['gpus_per_node']} GPUs, "
        f"EP={hw['ep']}",
        f"{m['layers']} layers ({m['gdn_layers']} GDN, {m['attention_layers']} attention), "
        f"{m['moe_layers']} MoE layers of {m['num_experts']} experts, top-{m['experts_per_token']}",
        "",
        "## Parameters",
    ]
    names = [k for k in par if not k.startswith("advertised")]
    rows = [
        [LABELS.get(k, k.replace("_", " ")), f"{par[k]:,}", f"{par[k] / 1e9:.2f} B"] for k in names
    ]
    for mine, claim in (("total", "advertised_total"), ("text_active", "advertised_active")):
        if claim in par:
            off = 100 * (par[mine] / par[claim] - 1)
            rows.append(
                [
                    f"{claim.replace('_', ' ')} ({mine.replace('_', ' ')} {off:+.2f}%)",
                    "",
                    f"{par[claim] / 1e9:.2f} B",
                ]
            )
    out += [
        table(["part", "parameters", ""], rows),
        "",
        "text total: the served model without its MTP head; total: text total plus the vision "
        "tower, which the advertised size counts and the engine does not load; text active: all "
        "but the routed experts, plus top-k/E of those.",
        "",
        f"## Bytes per GPU ({g['weights']} weights, MTP {'loaded' if hw['mtp'] else 'not loaded'})",
    ]
    lo, hi = g["experts_per_rank"]
    uneven = f"; {lo} on some ranks" if lo != hi else ""
    rows = [
        [
            "the whole text model, once (not per GPU)",
            g["replicated_bytes"] + g["expert_bytes_total"],
        ],
        ["replicated: all but the routed experts", g["replicated_bytes"]],
        [f"routed experts: {hi} of {m['num_experts']} per layer{uneven}", g["expert_bytes"]],
        ["weights", g["weights_bytes"]],
        [f"budget: {hw['gpu_memory_gib']:g} GiB x {hw['memory_utilization']:g}", g["budget_bytes"]],
        ["reserve: activations, all-to-all buffers", g["reserve_bytes"]],
        ["left for KV blocks and GDN state slots", g["cache_bytes"]],
    ]
    out += [table(["per GPU", "GiB"], [[k, f"{v / GiB:.2f}"] for k, v in rows]), ""]
    out += [
        "## Cache per sequence",
        f"KV per token: {cache['kv_bytes_per_token']:,} B ({cache['kv_bytes_per_token'] / KiB:.1f}"
        f" KiB). GDN state per sequence, whatever its length: {cache['gdn_state_bytes_per_seq']:,}"
        f" B ({cache['gdn_state_bytes_per_seq'] / MiB:.1f} MiB: conv "
        f"{cache['gdn_conv_bytes_per_seq'] / MiB:.1f} + recurrent "
        f"{cache['gdn_recurrent_bytes_per_seq'] / MiB:.1f}).",
        "",
        table(
            ["context", "MiB per sequence", "sequences per GPU", f"per group of {hw['ep']}"],
            [
                [
                    f["context"],
                    f"{f['bytes_per_seq'] / MiB:.0f}",
                    f["seqs_per_gpu"],
                    f["seqs_per_group"],
                ]
                for f in cache["fit"]
            ],
        ),
        "",
        table(
            ["batch per rank", "longest context each sequence can have"],
            [
                [b, "does not fit" if n is None else f"{n:,} tokens"]
                for b, n in cache["max_context"].items()
            ],
        ),
    ]
    share = p["all_to_all"]["per_token"]
    if not share:
        out += ["", "Dense model: no all-to-all."]
        return wrap(out)
    out += [
        "",
        "## All-to-all per decode step, uniform routing",
        f"Per token and MoE layer, of its {m['experts_per_token']} (token, expert) pairs "
        f"{share['pairs_off_gpu']:.3f} leave the GPU and {share['pairs_off_node']:.3f} the node. "
        f"Sent once per destination rank: {share['ranks_off_gpu']:.3f} ranks off the GPU, "
        f"{share['ranks_off_node']:.3f} off the node. Sent once per destination node: "
        f"{share['nodes_off_node']:.3f} nodes.",
        "",
        f"Bytes leaving each GPU, dispatch + combine, {m['hidden_size']} x "
        f"{hw['a2a_dtype_bytes']} B per hidden vector, {m['moe_layers']} MoE layers; NVLink "
        f"{hw['nvlink_gbps']:g} GB/s both ways ({hw['nvlink_gbps'] / 2:g} each way), InfiniBand "
        f"{hw['ib_gbit']:g} Gb/s ({hw['ib_gbit'] / 8:g} GB/s) per GPU.",
        "",
        table(
            [
                "batch per rank",
                "sent",
                "NVLink MB/layer",
                "IB MB/layer",
                "NVLink MB/step",
                "IB MB/step",
                "NVLink ms/step",
                "IB ms/step",
            ],
            [
                [
                    s["batch"],
                    "per pair" if s["mode"] == "pairs" else "per rank",
                    f"{s['nvlink_bytes_per_layer'] / 1e6:.2f}",
                    f"{s['ib_bytes_per_layer'] / 1e6:.2f}",
                    f"{s['nvlink_bytes_per_step'] / 1e6:.0f}",
                    f"{s['ib_bytes_per_step'] / 1e6:.0f}",
                    f"{s['nvlink_s_per_step'] * 1e3:.2f}",
                    f"{s['ib_s_per_step'] * 1e3:.2f}",
                ]
                for s in p["all_to_all"]["steps"]
            ],
        ),
    ]
    return wrap(out)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, Hardware]:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--config", required=True, help="a checkpoint's config.json (or its folder)")
    for f in fields(Hardware):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "weights":
            help_ = "bf16: this engine (it dequantises FP8 checkpoints); fp8: weights kept in FP8"
            a.add_argument(flag, choices=("bf16", "fp8"), default=f.default, help=help_)
        elif f.name == "mtp":
            a.add_argument(flag, action="store_true", help="load the MTP head (and its KV)")
        elif f.name in ("batches", "contexts"):
            a.add_argument(flag, type=int, nargs="+", default=list(f.default), help=HELP[f.name])
        else:
            a.add_argument(flag, type=type(f.default), default=f.default, help=HELP.get(f.name))
    a.add_argument("--advertised", help="e.g. 397B-A17B; default: read from the config's path")
    a.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = a.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(Hardware)}
    values["batches"], values["contexts"] = tuple(args.batches), tuple(args.contexts)
    for name in ("nodes", "gpus_per_node", "ep", "kv_dtype_bytes", "a2a_dtype_bytes"):
        if values[name] < 1:
            a.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        return args, Hardware(**values)
    except ValueError as e:
        a.error(str(e))


def main(argv: list[str] | None = None) -> None:
    args, hw = parse(argv)
    path = Path(args.config)
    raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    try:
        result = {"config": str(args.config), "hardware": asdict(hw), **plan(raw, hw)}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    claim = advertised(args.config, args.advertised)
    if claim:
        result["params"]["advertised_total"], result["params"]["advertised_active"] = claim
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
