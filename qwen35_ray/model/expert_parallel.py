"""Expert parallelism: each of N ranks holds a contiguous range of the routed experts.

Every rank runs its own tokens through attention, GDN, the router and the shared expert (data
parallel). In each MoE layer the (token, choice) pairs travel to the rank holding their expert
by one all-to-all, are computed there, weighted by their routing weight, and travel back by a
second one; the token's rank adds them up. The exchange runs over the default torch.distributed
group (gloo on CPU, NCCL on CUDA), one process per rank. Every rank must run every MoE layer's
exchange in the same order, a rank without tokens too (Qwen35ForCausalLM.idle_forward).

Legend: T = tokens, k = experts per token, E = experts, N = ranks, H = hidden size,
S = pairs this rank sends, R = pairs it receives.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from qwen35_kernels.moe import fused_moe


def expert_ranges(num_experts: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's experts: the first num_experts % size ranks hold one more
    (16 over 3: 6, 5, 5)."""
    base, extra = divmod(num_experts, size)
    ranges, start = [], 0
    for r in range(size):
        stop = start + base + (r < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


@dataclass(frozen=True)
class ExpertShard:
    """Rank `rank` of `size` ranks sharing `num_experts` routed experts per MoE layer."""

    rank: int
    size: int
    num_experts: int

    def __post_init__(self):
        if self.num_experts <= 0:
            raise ValueError(
                f"expert_parallel_size={self.size} needs a model with routed experts; this one "
                "is dense: use expert_parallel_size=1"
            )
        if not 1 <= self.size <= self.num_experts:
            raise ValueError(
                f"expert_parallel_size={self.size} must be between 1 and the model's "
                f"{self.num_experts} routed experts"
            )
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside expert_parallel_size={self.size}")

    def expert_ranges(self) -> list[tuple[int, int]]:
        return expert_ranges(self.num_experts, self.size)

    @property
    def start(self) -> int:
        return self.expert_ranges()[self.rank][0]

    @property
    def stop(self) -> int:
        return self.expert_ranges()[self.rank][1]

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    @cached_property
    def owner(self) -> torch.Tensor:
        """[E] int64: the rank holding each expert."""
        sizes = [b - a for a, b in self.expert_ranges()]
        return torch.repeat_interleave(torch.arange(self.size), torch.tensor(sizes))

    @cached_property
    def first(self) -> torch.Tensor:
        """[N] int64: each rank's first expert, to turn a global expert id into a local one."""
        return torch.tensor([a for a, _ in self.expert_ranges()], dtype=torch.int64)


class ExpertParallel:
    """The routed experts of one rank, called like fused_moe with this rank's local weights:
    (x [T, H], w_gate_up [E_local, 2I, H], w_down [E_local, H, I], topk_weights [T, k],
    topk_ids [T, k] global ids) -> [T, H]. One object serves every MoE layer of a model, so
    its counters add up the whole forward. `experts` computes this rank's pairs: the model's
    kernel backend's fused_moe (by default the op that dispatches on the device)."""

    def __init__(
        self,
        shard: ExpertShard,
        group: dist.ProcessGroup | None = None,
        experts: Callable = fused_moe,
    ):
        self.shard = shard
        self.group = group
        self.experts = experts
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._checked = False
        self._bytes = 0
        self._seconds = 0.0
        self._calls = 0

    def stats(self) -> dict:
        """Bytes this rank sent to other ranks (its own share stays local), seconds spent in
        the all-to-alls (on CUDA the host's wait: the counts exchange syncs each layer) and
        the number of all-to-all calls, since the model was built."""
        return {
            "all_to_all_bytes": self._bytes,
            "all_to_all_seconds": self._seconds,
            "all_to_all_calls": self._calls,
        }

    def __call__(
        self,
        x: torch.Tensor,  # [T, H]
        w_gate_up: torch.Tensor,  # [E_local, 2I, H]
        w_down: torch.Tensor,  # [E_local, H, I]
        topk_weights: torch.Tensor,  # [T, k]
        topk_ids: torch.Tensor,  # [T, k] global expert ids
    ) -> torch.Tensor:
        self._check_group()
        T, H = x.shape
        k = topk_ids.shape[1]
        owner, first = self._table(x.device)
        flat = topk_ids.reshape(-1)  # [T*k]
        dest = owner[flat]
        # pairs grouped by destination rank, as all_to_all_single's splits want them
        order = torch.argsort(dest, stable=True)  # [S]
        token = order // k
        send_counts = torch.bincount(dest, minlength=self.shard.size)  # [N]
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # local expert id and routing weight ride along as fp32 (ids exact below 2^24), viewed
        # as x's dtype so one exchange carries rows and metadata
        meta = torch.stack(
            [(flat[order] - first[dest[order]]).float(), topk_weights.reshape(-1)[order].float()],
            dim=1,
        )  # [S, 2]
        packed = torch.cat([x[token], meta.view(x.dtype)], dim=1)  # [S, H + m]
        got = packed.new_empty(sum(recv), packed.shape[1])  # [R, H + m]
        self._all_to_all(got, packed, recv, send)
        meta = got[:, H:].contiguous().view(torch.float32)  # [R, 2]
        ids = meta[:, :1].long()
        weights = meta[:, 1:].to(topk_weights.dtype)
        # k=1 with the pair's weight: the results come back already weighted
        y = self.experts(got[:, :H].contiguous(), w_gate_up, w_down, weights, ids)  # [R, H]
        back = y.new_empty(sum(send), H)  # [S, H]
        self._all_to_all(back, y, send, recv)
        # summed in fp32 as the local kernels combine a token's choices, rounded once
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, back.float()).to(x.dtype)

    def _all_to_all(self, output, input, output_splits=None, input_splits=None) -> None:
        start = time.perf_counter()
        dist.all_to_all_single(output, input, output_splits, input_splits, group=self.group)
        self._seconds += time.perf_counter() - start
        self._calls += 1
        row = math.prod(input.shape[1:]) * input.element_size()
        own = input_splits[self.shard.rank] if input_splits is not None else 1
        self._bytes += (input.shape[0] - own) * row

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = (self.shard.owner.to(device), self.shard.first.to(device))
        return self._tables[device]

    def _check_group(self) -> None:
        if self._checked:
            return
        if not dist.is_initialized():
            raise RuntimeError(
                "expert parallelism needs torch.distributed initialised in every rank process "
                "(dist.init_process_group) before the first forward"
            )
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if (size, rank) != (self.shard.size, self.shard.rank):
            raise RuntimeError(
                f"the process group has rank {rank} of {size}, but the model was built as rank "
                f"{self.shard.rank} of expert_parallel_size={self.shard.size}"
            )
        self._checked = True
