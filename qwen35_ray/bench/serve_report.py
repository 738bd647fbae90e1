"""How a `bench serve` report reads: one console line per run, a Markdown table for the docs,
and a PNG of latency against load (TTFT, TPOT and ITL, end-to-end latency, output tokens/s),
the offline engine's beside the server's when the run had one."""

import math
from pathlib import Path

MS = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731


def load_label(run: dict) -> str:
    parts = []
    if run["max_concurrency"] is not None:
        parts.append(f"concurrency {run['max_concurrency']}")
    if run["request_rate"] != "inf":
        parts.append(f"rate {run['request_rate']:g}/s")
    return ", ".join(parts) or "all at once"


def line(run: dict) -> str:
    text = (
        f"{load_label(run)}: {run['completed']}/{run['num_prompts']} ok "
        f"in {run['duration']:.1f} s, {run['output_throughput']:.1f} output tok/s"
    )
    if run.get("offline"):
        text += (
            f" (offline {run['offline']['output_throughput']:.1f}, "
            f"x{run['serving_offline_output_throughput_ratio']:.2f})"
        )
    for name in ("ttft", "tpot", "itl", "e2el"):
        cells = "/".join(MS(run.get(f"p{q}_{name}_ms")) for q in (50, 90, 99))
        text += f"; {name.upper()} p50/90/99 {cells} ms"
    if run["request_goodput"] is not None:
        text += f"; goodput {run['request_goodput']:.2f} req/s"
    return text


def markdown_table(report: dict) -> str:
    """The runs as docs/bench shows them: latencies in ms as p50 / p90 / p99."""
    offline = any(r.get("offline") for r in report["runs"])
    head = ["load", "ok", "s", "req/s", "output tok/s"]
    head += ["offline tok/s", "serving / offline"] if offline else []
    head += [f"{n} p50 / p90 / p99 ms" for n in ("TTFT", "TPOT", "ITL", "E2EL")]
    head += ["offline TTFT p50 ms"] if offline else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["runs"]:
        cells = [
            load_label(r),
            f"{r['completed']}/{r['num_prompts']}",
            f"{r['duration']:.1f}",
            f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}",
        ]
        o = r.get("offline")
        if offline:
            cells += [
                f"{o['output_throughput']:.1f}" if o else "-",
                f"{r['serving_offline_output_throughput_ratio']:.2f}" if o else "-",
            ]
        for n in ("ttft", "tpot", "itl", "e2el"):
            cells.append(" / ".join(MS(r.get(f"p{q}_{n}_ms")) for q in (50, 90, 99)))
        if offline:
            cells.append(MS(o.get("p50_ttft_ms")) if o else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "bench serve draws its plot with matplotlib, which is not installed: "
            'pip install -e ".[bench]" (or leave out --plot)'
        ) from None
    matplotlib.use("Agg")


def load_axis(runs: list[dict]) -> tuple[str, list[float]]:
    """What varies over the runs: the concurrency, the request rate, or else (both vary) the
    request throughput the runs achieved."""
    conc = [r["max_concurrency"] for r in runs]
    rates = [r["request_rate"] for r in runs]
    if len(set(rates)) == 1 and None not in conc:
        return "max concurrency", [float(c) for c in conc]
    if len(set(conc)) == 1 and "inf" not in rates:
        return "request rate (req/s, offered)", [float(r) for r in rates]
    return "request throughput (req/s, achieved)", [r["request_throughput"] for r in runs]


def plot(report: dict, path: Path) -> None:
    require_matplotlib()
    import matplotlib.pyplot as plt

    runs = report["runs"]
    label, xs = load_axis(runs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    panels = [
        (axes[0, 0], ["ttft"], "time to first token (ms)"),
        (axes[0, 1], ["tpot", "itl"], "time per output token, inter-token latency (ms)"),
        (axes[1, 0], ["e2el"], "end-to-end latency (ms)"),
    ]
    for ax, names, title in panels:
        for j, name in enumerate(names):
            for q, style in ((50, "-"), (90, "--"), (99, ":")):
                ys = [r.get(f"p{q}_{name}_ms") for r in runs]
                ys = [math.nan if y is None else y for y in ys]
                ax.plot(xs, ys, style, marker="o", color=f"C{j}", label=f"{name} p{q}")
            if any(r.get("offline") for r in runs):
                ys = [(r.get("offline") or {}).get(f"p50_{name}_ms") for r in runs]
                ys = [math.nan if y is None else y for y in ys]
                ax.plot(xs, ys, "-.", marker="x", color=f"C{j}", alpha=0.6,
                        label=f"offline {name} p50")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("ms")
    ax = axes[1, 1]
    ax.plot(xs, [r["output_throughput"] for r in runs], "-o", label="served")
    if any(r.get("offline") for r in runs):
        ys = [(r.get("offline") or {}).get("output_throughput", math.nan) for r in runs]
        ax.plot(xs, ys, "-.x", color="0.4", label="offline engine")
    ax.set_title("output tokens/s", fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel(label)
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    w = report["workload"]
    machine = report.get("machine", {})
    fig.suptitle(
        f"bench serve: {report.get('config') or report['base_url']}, {report['model_id']}, "
        f"{w['dataset']} in {w['input_len']} / out {w['output_len']} tokens, "
        f"{w['num_prompts']} prompts per run (commit {machine.get('commit')})",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
