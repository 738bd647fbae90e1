"""GET /metrics: every replica of the app in one scrape, through prometheus_client.

Each Serve replica of the app (every ingress replica, every engine replica of every pool) keeps
its own prometheus_client registry in its process, installed with `install()`: histograms and
counters it records as requests go (serving/metrics_engine.py, serving/request_log.py), and
collectors that read, when scraped, what the replica already counts (engine queues and cache,
its request counters, expert-parallel samples). Every series carries `pool` (the deployment)
and `replica` (Serve's replica id), and the engines' and ingress's also `model_name`.

/metrics on any ingress replica reads its own registry, runs `replica_families` in the process
of every other replica of its app (Ray's `actor.__ray_call__`, a DeveloperAPI that runs a
function on an actor, off its event loop), adds what the Serve controller knows (replicas per
pool, the autoscaling policies' last decisions), merges families of one name, and renders them
with prometheus_client's own exposition (Prometheus text, or OpenMetrics when the scraper asks
for it). So whichever ingress replica Serve's proxy picks, one scrape shows the whole app, and
its counts are exact at that moment.

Why not Ray's metrics agent (`ray.util.metrics`): its series reach Prometheus through one agent
per node, so the app's own /metrics could not show them without reading every agent back; they
are reported periodically (`metrics_report_interval_ms`), so a scrape right after a load run
lags; and every series gets Ray's labels (session, node, worker). Ray's and Serve's own metrics
(`ray_serve_*`) stay there; docs/metrics.md says how to scrape both. Why not Serve's
`record_routing_stats`: the controller polls it every second and sends it to every router;
histograms do not belong there, so that stays small.
"""

import asyncio
import logging

import ray
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from ray import serve

from qwen35_ray.serving.metrics_catalog import families

log = logging.getLogger("qwen35_ray.serving")

# a replica that does not answer a scrape within this is left out of it (replica_scraped 0)
SCRAPE_TIMEOUT_S = 5.0
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"

# this process's metrics: an object with collect() -> prometheus_client families
_source = None


def install(source) -> None:
    """Make `source` what this replica's process reports (one Serve replica per process)."""
    global _source
    _source = source


def replica_names(default_pool: str) -> tuple[str, str]:
    """(deployment, replica id) of the calling Serve replica; (default_pool, "local") outside
    Serve."""
    try:
        ctx = serve.get_replica_context()
    except Exception:
        return default_pool, "local"
    return ctx.deployment, ctx.replica_id.unique_id


def replica_families(_actor=None) -> list:
    """This process's families (run in another replica's process through __ray_call__)."""
    return [] if _source is None else list(_source.collect())


async def app_families(own_source, app_samples=()) -> list:
    """The families of every replica of the calling replica's app, merged: `own_source`'s
    (this replica's), the others' asked through Ray, `app_samples` (name, labels, value) and
    qwen35_ray_replica_scraped{pool,replica}."""
    ctx = serve.get_replica_context()
    prefix = f"{REPLICA_ACTOR_PREFIX}{ctx.app_name}#"
    own = f"{prefix}{ctx.deployment}#{ctx.replica_id.unique_id}"
    # listing actors and looking them up are calls to the GCS: off the event loop
    refs = await asyncio.to_thread(_ask_replicas, prefix, own)
    found = [await asyncio.to_thread(own_source.collect)]
    answered = {own}
    waiting = {asyncio.ensure_future(_get(ref)): name for name, ref in refs.items()}
    if waiting:
        done, late = await asyncio.wait(waiting, timeout=SCRAPE_TIMEOUT_S)
        for task in late:
            task.cancel()
        for task in done:
            if task.result() is not None:
                found.append(task.result())
                answered.add(waiting[task])
    scraped = []
    for name in sorted({*refs, own}):
        _, pool, replica = name.removeprefix(REPLICA_ACTOR_PREFIX).split("#", 2)
        up = int(name in answered)
        scraped.append(("qwen35_ray_replica_scraped", {"pool": pool, "replica": replica}, up))
    found.append(list(families([*scraped, *app_samples])))
    return merge(found)


def _ask_replicas(prefix: str, own: str) -> dict:
    """{actor name: ref of its replica_families()} for the app's other live replicas (Serve
    names them "SERVE_REPLICA::<app>#<deployment>#<id>" in namespace "serve")."""
    refs = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if a["namespace"] != "serve" or not name.startswith(prefix) or name == own:
            continue
        try:
            actor = ray.get_actor(name, namespace="serve")
        except (ray.exceptions.RayError, ValueError):
            continue  # gone since it was listed
        refs[name] = actor.__ray_call__.remote(replica_families)
    return refs


async def _get(ref):
    try:
        return await ref
    except ray.exceptions.RayError as e:  # a replica that died while asked
        log.debug("a replica did not give its metrics: %s", e)
        return None


def merge(sources: list[list]) -> list:
    """Families of one name from several replicas as one family (their series differ in
    pool and replica). The first source's HELP and type stand."""
    merged: dict[str, object] = {}
    for source in sources:
        for family in source:
            if family.name not in merged:
                merged[family.name] = family
                continue
            kept = merged[family.name]
            if kept.type != family.type:
                log.warning("metric %s is a %s and a %s", family.name, kept.type, family.type)
                continue
            kept.samples = [*kept.samples, *family.samples]
    return list(merged.values())


class _Families:
    def __init__(self, found: list):
        self.found = found

    def collect(self):
        return self.found


def exposition(found: list, accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of families in the format `accept` asks for, by
    prometheus_client's negotiation."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(found))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
