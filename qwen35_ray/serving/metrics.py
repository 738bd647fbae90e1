"""Prometheus text for /metrics, and the per-replica stats of a pool."""

import ray
from ray import serve

Sample = tuple[str, dict[str, str], float]


def kind(name: str) -> str:
    if name.endswith(("_free", "slots_total", "blocks_total")):
        return "gauge"
    return "counter" if name.endswith("_total") else "gauge"


def render(samples: list[Sample]) -> str:
    """One TYPE line per metric, then its samples (Prometheus text format 0.0.4)."""
    by_name: dict[str, list[Sample]] = {}
    for sample in samples:
        by_name.setdefault(sample[0], []).append(sample)
    lines = []
    for name, group in by_name.items():
        lines.append(f"# TYPE qwen35_ray_{name} {kind(name)}")
        for _, labels, value in group:
            tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"qwen35_ray_{name}{{{tags}}} {value}".replace("{}", ""))
    return "\n".join(lines) + "\n"


def samples(stats: dict, labels: dict | None = None) -> list[Sample]:
    return [
        (k, labels or {}, v)
        for k, v in stats.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


async def replica_stats(deployment: str) -> list[dict]:
    """record_routing_stats() of every live replica of a deployment in this app.

    Serve names replica actors "SERVE_REPLICA::<app>#<deployment>#<id>" in namespace "serve";
    a replica that dies while asked is skipped."""
    prefix = f"SERVE_REPLICA::{serve.get_replica_context().app_name}#{deployment}#"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    ]
    out = []
    for name in sorted(names):
        try:
            out.append(await ray.get_actor(name, namespace="serve").record_routing_stats.remote())
        except (ray.exceptions.RayError, ValueError):
            continue
    return out
