"""The text `qwen35-ray plan` prints: the memory tables, the layout, and the comments heading
the files it writes. Reads the figures dict of deploy/plan.py (exact integers) and rounds."""

import textwrap

from qwen35_ray.deploy import layout as lo
from qwen35_ray.deploy.sizing import GiB

MiB, KiB = 2**20, 2**10
NIC_GBPS = 50.0  # GB/s: one 400 Gb/s NIC, each way


def gib(b: int) -> str:
    return f"{b / GiB:.2f}"


def n_of(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table: the first column left-aligned, the others right."""
    cells = [header] + [[str(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    just = [str.ljust] + [str.rjust] * (len(widths) - 1)
    rule = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    lines = ["| " + " | ".join(j(x, w) for j, x, w in zip(just, r, widths)) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "|".join(rule) + "|", *lines[1:]])


def title(name: str, cl: dict) -> str:
    return (
        f"{name} on {n_of(cl['nodes'], 'node')} x {n_of(cl['gpus_per_node'], 'GPU')} "
        f"({cl['gpus']} in all) of {gib(cl['gpu_memory_bytes'])} GiB, context {cl['context']}"
    )


def report(name: str, f: dict) -> str:
    m, cl, ctx, d = f["model"], f["cluster"], f["cluster"]["context"], f["dims"]
    chosen = f.get("layout", {}).get("ep")
    out = [
        f"# {title(name, cl)}",
        f"{m['layers']} layers ({m['gdn_layers']} GDN, {m['attention_layers']} attention), "
        f"{m['moe_layers']} MoE layers of {m['num_experts']} routed experts, top-"
        f"{m['experts_per_token']}; parameters: {m['params_text_total'] / 1e9:.2f} B in the text "
        f"model, {m['params_text_active'] / 1e9:.2f} B active per token (+ "
        f"{m['params_vision'] / 1e9:.2f} B vision tower, not loaded)",
        "",
        f"## Weights per GPU by EP size ({cl['weights']}; budget "
        f"{gib(cl['gpu_memory_bytes'])} GiB x {cl['memory_utilization']:g} = "
        f"{gib(f['ep_table'][0]['budget_bytes'])} GiB, {cl['reserve_gib']:g} GiB of it kept "
        "for activations)",
        "cache room = budget - weights - reserve",
        table(
            [
                "EP",
                "replicated GiB",
                "experts per rank",
                "expert GiB",
                "weights GiB",
                "cache room GiB",
                f"seqs per GPU at {ctx}",
                "fits?",
            ],
            [
                [
                    r["ep"],
                    gib(r["replicated_bytes"]),
                    r["experts_per_rank"],
                    gib(r["expert_bytes"]),
                    gib(r["weights_bytes"]),
                    gib(r["room_bytes"]),
                    r["seqs_per_gpu"],
                    ("yes" if r["seqs_per_gpu"] else "no")
                    + (" <- chosen" if r["ep"] == chosen else ""),
                ]
                for r in f["ep_table"]
            ],
        ),
        "",
        "## Caches",
        f"KV per token: {m['attention_layers']} attention layers x 2 (K, V) x "
        f"{d['kv_heads']} KV heads x {d['head_dim']} head dim x 2 B = "
        f"{f['kv_bytes_per_token']:,} B ({f['kv_bytes_per_token'] / KiB:.1f} KiB)",
        f"GDN state per sequence: {m['gdn_layers']} GDN layers x (conv {d['conv_dim']} channels x "
        f"{d['conv_kernel'] - 1} x 2 B + recurrent {d['value_heads']} heads x "
        f"{d['key_head_dim']} x {d['value_head_dim']} x 4 B) = {f['gdn_conv_bytes_per_seq']:,} + "
        f"{f['gdn_recurrent_bytes_per_seq']:,} = {f['gdn_state_bytes_per_seq']:,} B "
        f"({f['gdn_state_bytes_per_seq'] / MiB:.2f} MiB)",
        f"one sequence of L tokens: {f['state_slots_per_seq']} x GDN state"
        + (" (its slot and a prefix-cache snapshot slot)" if f["state_slots_per_seq"] == 2 else "")
        + f" + ceil(L / {lo.BLOCK_SIZE}) x {lo.BLOCK_SIZE} x KV per token",
    ]
    if "error" in f:
        return "\n".join([*out, "", f"## Layout\n{name} {f['error']}"])
    lay, e = f["layout"], f["engine"]
    room = next(r for r in f["ep_table"] if r["ep"] == lay["ep"])["room_bytes"]
    out += [
        "",
        f"## Sequences at EP {lay['ep']} ({gib(room)} GiB of cache room per GPU)",
        table(
            [
                "context",
                "MiB per sequence",
                "per GPU",
                f"per replica ({lay['ep']} GPUs)",
                f"cluster ({n_of(lay['replicas'], 'replica')})",
            ],
            [
                [
                    s["context"],
                    f"{s['bytes_per_seq'] / MiB:.1f}",
                    s["per_gpu"],
                    s["per_replica"],
                    s["cluster"],
                ]
                for s in f["sequences"]
            ],
        ),
        "",
        "## Prefill -> decode transfer per request (RequestState tensors: GDN state + prompt "
        "tokens x KV per token)",
        table(
            ["prompt tokens", "bytes", "MiB", f"ms at {NIC_GBPS:g} GB/s"],
            [
                [
                    t["prompt_tokens"],
                    f"{t['bytes']:,}",
                    f"{t['bytes'] / MiB:.1f}",
                    f"{t['bytes'] / (NIC_GBPS * 1e6):.1f}",
                ]
                for t in f["transfer"]
            ],
        ),
        "",
        "## Layout",
        f"EP {lay['ep']}: {lay['why']}.",
        layout_line(lay) + ".",
        f"engine per {'rank' if lay['ep'] > 1 else 'replica'}: max_num_seqs "
        f"{e['max_num_seqs']}, max_model_len {e['max_model_len']}, kv_cache_memory_bytes "
        f"{e['kv_cache_memory_bytes']:,} ({gib(e['kv_cache_memory_bytes'])} GiB, "
        f"{e['kv_cache_memory_bytes'] // f['kv_bytes_per_token']:,} tokens), state_memory_bytes "
        f"{e['state_memory_bytes']:,} ({gib(e['state_memory_bytes'])} GiB)",
    ]
    return "\n".join(out)


def layout_line(lay: dict) -> str:
    where = {
        None: "",
        "STRICT_PACK": ", each group within a node (STRICT_PACK)",
        "PACK": ", each group over nodes (PACK)",
    }[lay["placement"]]
    replicas = f"{n_of(lay['replicas'], 'replica')} of {n_of(lay['ep'], 'GPU')}{where}"
    if not lay["disaggregated"]:
        return f"{replicas}: the collocated app (build_app)"
    pins = (
        f"prefill on {n_of(lay['prefill_nodes'], 'node')} advertising prefill_node, decode on "
        f"{lay['decode_nodes']} advertising decode_node"
        if lay["prefill_nodes"]
        else "both pools on the one node, unpinned (placed by GPU count)"
    )
    return (
        f"{replicas}: the disaggregated app (build_pd_app), {lay['prefill']} prefill : "
        f"{lay['decode']} decode; {pins}"
    )


def about(name: str, f: dict) -> list[str]:
    """The plan in brief, as paragraphs, for the comments heading the files."""
    lay, e = f["layout"], f["engine"]
    row = next(r for r in f["ep_table"] if r["ep"] == lay["ep"])
    snapshots = e["max_num_seqs"] * (f["state_slots_per_seq"] - 1)
    return [
        f"qwen35-ray plan: {title(name, f['cluster'])}, bf16 weights.",
        f"EP {lay['ep']}: {lay['why']}. {layout_line(lay)}.",
        f"Per GPU: {gib(row['weights_bytes'])} GiB of weights ({gib(row['replicated_bytes'])} "
        f"replicated + {gib(row['expert_bytes'])} of routed experts, {row['experts_per_rank']} "
        f"per layer); of {gib(row['room_bytes'])} GiB of cache room, KV "
        f"{gib(e['kv_cache_memory_bytes'])} GiB and GDN state {gib(e['state_memory_bytes'])} "
        f"GiB ({e['max_num_seqs']} slots + {snapshots} prefix-cache snapshots).",
        "Replica counts are fixed; docs/autoscaling.md adds an autoscaling_config per pool.",
    ]


def comment(paragraphs: list[str], command: str) -> list[str]:
    """Paragraphs wrapped to fit 100 columns once commented, then the command that wrote it."""
    wrap = lambda t, **kw: textwrap.wrap(t, 96, break_on_hyphens=False, **kw)  # noqa: E731
    lines = [w for t in paragraphs for w in wrap(t)]
    return [*lines, "Written by:", *wrap(command, initial_indent="  ", subsequent_indent="    ")]


def pods(groups) -> str:
    return "; ".join(
        f"{g.name}: {n_of(g.replicas, 'pod')} of {g.gpus} GPUs, {g.cpus} CPUs, {g.memory}"
        + (f", advertising {', '.join(g.ray_resources)}" if g.ray_resources else "")
        for g in groups
    )
