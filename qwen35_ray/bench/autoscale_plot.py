"""The plot of a `bench autoscale` report: replicas per pool over time with the phases shaded,
and TTFT and ITL per load phase."""

from pathlib import Path

COLORS = {"prefill": "tab:blue", "decode": "tab:orange"}


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "bench autoscale draws its plot with matplotlib, which is not installed: "
            'pip install -e ".[bench]" (or pass --no-plot)'
        ) from None
    matplotlib.use("Agg")


def plot(report: dict, path: Path) -> None:
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 7.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    _replicas(fig.add_subplot(grid[0, :]), report)
    loads = [p for p in report["phases"] if p["workload"]]
    for ax, key, title in (
        (fig.add_subplot(grid[1, 0]), "ttft_s", "time to first token"),
        (fig.add_subplot(grid[1, 1]), "itl_s", "inter-token latency (between chunks)"),
    ):
        _latency(ax, loads, key, title)
    machine = report.get("machine", {})
    fig.suptitle(
        f"bench autoscale: {report.get('config') or report['url']}, {report['model']}, "
        f"{report['failed']} failed requests (commit {machine.get('commit')})"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _replicas(ax, report: dict) -> None:
    samples = report["samples"]
    t = [s["t"] for s in samples]
    pools = sorted({p for s in samples for p in s["running"]})
    for i, pool in enumerate(pools):
        color = f"C{i + 2}"
        # offset the lines a hair so equal counts of two pools stay visible
        dy = 0.03 * (i - (len(pools) - 1) / 2)
        run = [s["running"].get(pool, 0) + dy for s in samples]
        ax.step(t, run, where="post", color=color, lw=2, label=f"{pool} running")
        up = [s["running"].get(pool, 0) + s.get("starting", {}).get(pool, 0) + dy for s in samples]
        if up != run:
            ax.step(t, up, where="post", color=color, lw=1, ls="--",
                    label=f"{pool} running + starting")  # fmt: skip
        if any(pool in s.get("desired", {}) for s in samples):
            want = [s.get("desired", {}).get(pool, float("nan")) + dy for s in samples]
            ax.step(t, want, where="post", color=color, lw=1, ls="-.",
                    label=f"{pool} policy's desired")  # fmt: skip
    # the policies' decisions (from the controller log): a change is asked for here, and the
    # solid line shows when the replica started or stopped
    for d in report.get("decisions", []):
        if d["pool"] in pools:
            color = f"C{pools.index(d['pool']) + 2}"
            ax.axvline(d["t"], color=color, ls=":", lw=1)
            change = d["line"].split("_policy: ", 1)[1].split(":", 1)[0]
            ax.text(d["t"], 0.1, f" {change}", color=color, fontsize=8, rotation=90, va="bottom")
    top = max([s["running"].get(p, 0) + s.get("starting", {}).get(p, 0)
               for s in samples for p in pools] or [1])  # fmt: skip
    for phase in report["phases"]:
        color = COLORS.get(phase["name"], "0.85")
        ax.axvspan(phase["start_s"], phase["end_s"], color=color, alpha=0.12, lw=0)
        ax.text((phase["start_s"] + phase["end_s"]) / 2, top + 0.35, phase["name"],
                ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylim(0, top + 0.8)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("seconds since the bench started")
    ax.set_ylabel(f"replicas ({report['replica_source']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(alpha=0.3)


def _latency(ax, loads: list[dict], key: str, title: str) -> None:
    width = 0.38
    for j, stat in enumerate(("p50", "p90")):
        xs = [i + (j - 0.5) * width for i in range(len(loads))]
        values = [p[key][stat] for p in loads]
        ms = [1000 * v if v is not None else 0 for v in values]
        bars = ax.bar(xs, ms, width, label=stat, color=f"0.{4 + 3 * j}")
        # a phase of one-token requests has no inter-token gaps: not measured, not zero
        labels = [f"{x:.0f}" if v is not None else "n/a" for x, v in zip(ms, values)]
        ax.bar_label(bars, labels, fontsize=8)
    ax.set_xticks(range(len(loads)), [p["name"] for p in loads])
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
