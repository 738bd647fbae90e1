"""The rank actors of one expert-parallel group: placement group, actors, torch.distributed.

One bundle per rank. Inside a Serve replica the replica's own placement group is used: the
replica sits in bundle 0 and the ranks take the last N bundles. Elsewhere (the offline LLM)
a placement group of N bundles is created here and removed again by kill().
"""

import logging
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwen35_ray.distributed.config import EPConfig
from qwen35_ray.distributed.rank_worker import RankWorker

log = logging.getLogger(__name__)

# a placement group the cluster cannot hold fails start-up after this long, saying why
READY_TIMEOUT_S = 60.0
# the rendezvous of torch.distributed, and any one collective afterwards
COLLECTIVE_TIMEOUT_S = 600.0


@dataclass
class RankGroup:
    actors: list  # RankWorker handles, in rank order
    placement_group: PlacementGroup
    owns_placement_group: bool

    def kill(self) -> None:
        """Kill every rank (no graceful exit: a rank may be stuck in a collective) and remove
        the placement group if this group made it. Again, or after Ray is gone: nothing."""
        try:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self.owns_placement_group:
                self.owns_placement_group = False
                remove_placement_group(self.placement_group)
        except Exception:
            log.debug("ending the rank group failed", exc_info=True)


def bundle(ep: EPConfig) -> dict[str, float]:
    return {"CPU": ep.num_cpus, **({"GPU": ep.num_gpus} if ep.num_gpus else {})}


def start_group(ep: EPConfig, device: str, pg: PlacementGroup | None = None) -> RankGroup:
    """N rank actors in their bundles, joined in one torch.distributed group (gloo on CPU,
    NCCL on GPU). Nothing is loaded yet (load_shards)."""
    owns = pg is None
    if owns:
        pg = placement_group([bundle(ep)] * ep.size, strategy=ep.placement_strategy)
        _wait_ready(pg, ep)
    elif pg.bundle_count < ep.size:
        raise ValueError(
            f"expert_parallel_size={ep.size} needs {ep.size} placement-group bundles for its "
            f"ranks; the replica's placement group has {pg.bundle_count}"
        )
    first = pg.bundle_count - ep.size
    num_threads = max(1, int(ep.num_cpus))
    actors = [
        RankWorker.options(
            num_cpus=ep.num_cpus,
            num_gpus=ep.num_gpus,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=first + r
            ),
        ).remote(r, ep.size, num_threads)
        for r in range(ep.size)
    ]
    group = RankGroup(actors, pg, owns)
    try:
        host, port = ray.get(actors[0].address.remote(), timeout=READY_TIMEOUT_S)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        timeout = COLLECTIVE_TIMEOUT_S
        ray.get(
            [a.init_distributed.remote(backend, host, port, timeout) for a in actors],
            timeout=timeout,
        )
    except BaseException:
        group.kill()
        raise
    return group


def load_shards(group: RankGroup, path: str, dtype, device: str, cache_size, engine_config):
    """Every rank loads its shard and allocates its cache, together; their info() dicts."""
    start = time.perf_counter()
    try:
        infos = ray.get(
            [a.load.remote(path, dtype, device, cache_size, engine_config) for a in group.actors]
        )
    except BaseException:
        group.kill()
        raise
    log.debug("the ranks loaded their shards in %.1f s", time.perf_counter() - start)
    return infos


def _wait_ready(pg: PlacementGroup, ep: EPConfig) -> None:
    try:
        ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        total, free = ray.cluster_resources(), ray.available_resources()
        have = lambda r: {k: r.get(k, 0) for k in bundle(ep)}
        raise RuntimeError(
            f"expert_parallel_size={ep.size} asks for {ep.size} bundles of {bundle(ep)} "
            f"(rank_num_cpus={ep.num_cpus}, rank_num_gpus={ep.num_gpus}, "
            f"placement_strategy={ep.placement_strategy}); the Ray cluster could not place "
            f"them in {READY_TIMEOUT_S:.0f} s: it has {have(total)} in total, {have(free)} "
            "free. Lower expert_parallel_size or the per-rank resources, free or add nodes"
            + (", or relax the strategy to PACK" if ep.placement_strategy == "STRICT_PACK" else "")
        ) from None
