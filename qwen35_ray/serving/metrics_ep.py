"""A replica's expert-parallel samples for /metrics (serving/metrics.py renders them): what each
rank holds of the experts, all-to-all traffic, and how evenly tokens reach experts and ranks."""

import asyncio
import logging
import time

import torch

from qwen35_ray.model.expert_parallel import expert_ranges

log = logging.getLogger("qwen35_ray.serving")

# (name, labels, value): a sample before serving/metrics.py makes it a prometheus_client family
Sample = tuple[str, dict[str, str], float]

# MoE layers x experts up to which /metrics carries each expert's token count (expert_tokens):
# the tiny checkpoints (8 x 16) do; Qwen3.5-397B-A17B's 60 x 512 would be 30,720 series per
# replica, so large models get the per-layer max/mean gauges only (see expert_samples)
PER_EXPERT_SERIES_LIMIT = 4096
# expert-parallel stats cost a call to every rank: refreshed at most this often
EXPERT_STATS_MAX_AGE_S = 1.0


def expert_samples(size: int, infos: list[dict], load) -> list[Sample]:
    """A replica's expert-parallel samples. infos: each rank's executor info(); load: the
    group's ExpertLoadSnapshot (None: a dense model). Series:
    - expert_parallel_size; expert_bytes_resident{rank} and expert_bytes_total (all ranks);
    - all_to_all_bytes_total{rank} and all_to_all_seconds_total{rank} (sent, and spent in the
      all-to-alls, since start);
    - over the load window (expert_load_window_steps steps), per MoE layer (the model's MoE
      layers in order, from 0): expert_load_max_over_mean{layer} (tokens of the busiest expert
      over the mean) and rank_load_max_over_mean{layer} (the same per rank: the busiest rank
      sets the layer's pace; 1.0 is perfect balance, 0 a layer that routed nothing);
    - expert_tokens{layer,expert}: tokens routed to each expert, only while layers x experts
      <= PER_EXPERT_SERIES_LIMIT."""
    out: list[Sample] = [("expert_parallel_size", {}, size)]
    for info in infos:
        rank = {"rank": str(info["rank"])}
        if "expert_bytes" in info:
            out.append(("expert_bytes_resident", rank, info["expert_bytes"]))
        if "all_to_all_bytes" in info:
            out.append(("all_to_all_bytes_total", rank, info["all_to_all_bytes"]))
            out.append(("all_to_all_seconds_total", rank, info["all_to_all_seconds"]))
    if infos and "expert_bytes_total" in infos[0]:
        out.append(("expert_bytes_total", {}, infos[0]["expert_bytes_total"]))
    if load is None or load.counts.numel() == 0:
        return out
    counts = load.counts.double()  # [L, E]
    ranks = torch.stack(
        [counts[:, a:b].sum(1) for a, b in expert_ranges(counts.shape[1], size)], 1
    )  # [L, N]
    out.append(("expert_load_window_steps", {}, load.steps))
    for name, per in (("expert_load_max_over_mean", counts), ("rank_load_max_over_mean", ranks)):
        mean = per.mean(1)
        ratio = torch.where(mean > 0, per.max(1).values / mean.clamp(min=1e-12), 0.0)
        out += [(name, {"layer": str(i)}, round(float(r), 6)) for i, r in enumerate(ratio)]
    if counts.numel() <= PER_EXPERT_SERIES_LIMIT:
        out += [
            ("expert_tokens", {"layer": str(i), "expert": str(e)}, int(n))
            for i, row in enumerate(load.counts.tolist())
            for e, n in enumerate(row)
        ]
    return out


class ExpertMetrics:
    """The expert samples of one replica's engine (LLMEngine or DPEngine), cached: reading
    them asks every rank, so it runs in a worker thread, at most every
    EXPERT_STATS_MAX_AGE_S."""

    def __init__(self, engine):
        if hasattr(engine, "rank_info"):  # DPEngine: its ranks' executors are actors
            self.size, self._infos, self._load = engine.size, engine.rank_info, engine.expert_load
        else:
            executor = engine.executor
            self.size, self._infos, self._load = 1, lambda: [executor.info()], executor.expert_load
        self.samples: list[Sample] = [("expert_parallel_size", {}, self.size)]
        self._at = float("-inf")
        self._refresh: asyncio.Task | None = None

    def collect(self) -> list[Sample]:
        """Ask the ranks now (blocking)."""
        return expert_samples(self.size, self._infos(), self._load())

    def describe(self) -> str:
        """For the start-up log: what each rank holds of the experts."""
        infos = self._infos()
        if not infos or "expert_bytes" not in infos[0]:
            return ""
        held = ", ".join(f"{i['expert_bytes'] / 2**20:.1f}" for i in infos)
        return f", expert MiB per rank {held} of {infos[0]['expert_bytes_total'] / 2**20:.1f}"

    def cached(self) -> dict:
        """For a sync caller: in a worker thread (where Serve runs sync methods), samples at
        most EXPERT_STATS_MAX_AGE_S old, asked for here; on an event loop, the last ones at
        once, and a refresh started for the next call."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._start_refresh(loop)
        elif self._stale():
            self._collect_now()
        return {"labelled": self.samples}

    def _stale(self) -> bool:
        return time.monotonic() - self._at > EXPERT_STATS_MAX_AGE_S

    def _start_refresh(self, loop) -> asyncio.Task | None:
        if self._refresh is None and self._stale():
            self._refresh = loop.create_task(self._run_refresh())
        return self._refresh

    async def _run_refresh(self) -> None:
        try:
            await asyncio.to_thread(self._collect_now)
        finally:
            self._refresh = None

    def _collect_now(self) -> None:
        try:
            self.samples = self.collect()
        except Exception as e:
            # a rank that is gone: the health check replaces the replica
            log.debug("expert stats unavailable: %s", e)
        finally:
            self._at = time.monotonic()
