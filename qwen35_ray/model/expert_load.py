"""Expert load: how many (token, choice) pairs each MoE layer routed to each expert, recently.

Each tracked SparseMoE adds its routed ids into an `expert_counts` buffer [E] during the
forward (a fixed-shape index_add, so a compiled graph can hold it too). `end_step()` folds those
into a ring of buckets: the window keeps the last `window_steps` steps at the granularity of one
bucket, in memory bounded by buckets x layers x experts (10 x 60 x 512 int64 = 2.4 MiB) however
long the engine runs. Counts are of this rank's tokens only; the ranks' snapshots add up.

Legend: L = tracked MoE layers, E = experts, B = buckets.
"""

from dataclasses import dataclass

import torch
from torch import nn

from qwen35_ray.model.expert_parallel import expert_ranges

NUM_BUCKETS = 10


@dataclass(frozen=True)
class ExpertLoadSnapshot:
    counts: torch.Tensor  # [L, E] int64 pairs routed to each expert over the window
    steps: int  # steps the window spans

    @staticmethod
    def merge(snapshots: list["ExpertLoadSnapshot"]) -> "ExpertLoadSnapshot":
        """The group's load: the ranks' tokens are disjoint, so counts add; the ranks step
        together, so the window is the longest one."""
        if not snapshots:
            raise ValueError("merge needs at least one snapshot")
        counts = torch.stack([s.counts for s in snapshots]).sum(0)
        return ExpertLoadSnapshot(counts, max(s.steps for s in snapshots))

    def imbalance(self, shard_size: int) -> dict[str, float]:
        """Max over mean of the pairs per expert and per rank (experts split as ExpertShard
        does over `shard_size` ranks), averaged over the layers that routed any pair; 0.0 when
        none did. 1.0 is perfect balance; the busiest rank sets the layer's pace."""
        counts = self.counts.double()
        counts = counts[counts.sum(1) > 0]
        if counts.shape[0] == 0:
            return {"expert_max_over_mean": 0.0, "rank_max_over_mean": 0.0}
        ranks = torch.stack(
            [counts[:, a:b].sum(1) for a, b in expert_ranges(counts.shape[1], shard_size)], 1
        )  # [L, N]
        return {
            "expert_max_over_mean": _max_over_mean(counts),
            "rank_max_over_mean": _max_over_mean(ranks),
        }


def _max_over_mean(x: torch.Tensor) -> float:
    return float((x.max(1).values / x.mean(1)).mean())


class ExpertLoad:
    """The recorder of a model's MoE layers (modules with an `expert_counts` [E] int64 buffer,
    which this class installs)."""

    def __init__(self, layers: list[nn.Module], num_experts: int, window_steps: int = 1000):
        if window_steps < NUM_BUCKETS:
            raise ValueError(f"expert load window_steps={window_steps} must be >= {NUM_BUCKETS}")
        self.layers = layers
        self.num_experts = num_experts
        self.window_steps = window_steps
        self.bucket_steps = -(-window_steps // NUM_BUCKETS)
        for m in layers:
            m.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64),
                              persistent=False)  # fmt: skip
        self.reset()

    def reset(self) -> None:
        """Forget everything (also: after Module.to_empty the buffers hold garbage)."""
        for m in self.layers:
            if m.expert_counts.device.type != "meta":
                m.expert_counts.zero_()
        self._ring: torch.Tensor | None = None  # [B, L, E], made on the counts' device
        self._steps = [0] * NUM_BUCKETS
        self._head = 0

    def end_step(self) -> None:
        """Close a step: this step's counts go into the newest bucket."""
        if not self.layers:
            return
        counts = torch.stack([m.expert_counts for m in self.layers])  # [L, E]
        if self._ring is None:
            self._ring = counts.new_zeros(NUM_BUCKETS, *counts.shape)
        self._ring[self._head] += counts
        for m in self.layers:
            m.expert_counts.zero_()
        self._steps[self._head] += 1
        if self._steps[self._head] == self.bucket_steps:
            # the oldest bucket makes room for the next steps
            self._head = (self._head + 1) % NUM_BUCKETS
            self._ring[self._head].zero_()
            self._steps[self._head] = 0

    def snapshot(self) -> ExpertLoadSnapshot:
        """The closed steps of the window (between window_steps - bucket_steps and
        window_steps of them once it is full), on CPU."""
        if self._ring is None:
            counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64)
        else:
            counts = self._ring.sum(0).cpu()
        return ExpertLoadSnapshot(counts, sum(self._steps))
