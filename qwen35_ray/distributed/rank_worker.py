"""RankWorker: the Ray actor of one expert-parallel rank.

It holds what an in-process engine holds of the model: this rank's shard of the weights (every
non-expert weight, 1/N of the routed experts), its own HybridCache, and an InProcessExecutor
that runs forward and sampling. The driver's LLMEngine for this rank keeps the scheduler and
the block accounting and sends one StepBatch per step.

Calls run one at a time, in the order the driver sent them (the default concurrency group has
max_concurrency=1): a step must see the slot copies queued before it. `ping`, `info` and
`expert_load` run in a group of their own, so a health check is answered while a step runs
(or hangs in a collective whose peer died).
"""

import os
import socket
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from qwen35_ray.engine.executor import InProcessExecutor, StepBatch, StepResult
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.expert_parallel import ExpertShard
from qwen35_ray.model.loader import load_model

MONITOR = "monitor"


@ray.remote(concurrency_groups={MONITOR: 1})
class RankWorker:
    def __init__(self, rank: int, size: int, num_threads: int):
        # the bundle reserves num_cpus; torch's default (every core) would oversubscribe them
        torch.set_num_threads(num_threads)
        self.rank, self.size = rank, size
        self.model = self.executor = None
        self.expert_range = (0, 0)

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it, for the group's rendezvous (rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, backend: str, host: str, port: int, timeout_s: float) -> None:
        """Join the group's torch.distributed default group; every rank calls this together.
        timeout_s bounds a collective: a peer that hangs fails the step instead of freezing it."""
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            world_size=self.size,
            rank=self.rank,
            timeout=timedelta(seconds=timeout_s),
        )

    def load(self, path: str, dtype, device: str, cache_size, engine_config) -> dict:
        """Load this rank's shard and allocate its cache (CacheSize from the driver, so that
        the driver's block accounting and this cache agree); return info()."""
        config = ModelConfig.from_hf(path)
        shard = ExpertShard(self.rank, self.size, config.num_experts)
        self.expert_range = (shard.start, shard.stop)
        model, config, _ = load_model(
            path, dtype=dtype, device=device, expert_shard=shard, progress=False,
            kernels=engine_config.kernels,
        )  # fmt: skip
        self.model = model
        torch_dtype = next(model.parameters()).dtype
        self.executor = InProcessExecutor.create(
            model, config, cache_size, engine_config, torch_dtype, device
        )
        return self.info()

    def step(self, copies: list[tuple[int, int]], batch: StepBatch) -> StepResult:
        """copies: slot copies the driver queued since its last call, applied first. An empty
        batch runs every MoE layer's exchange with no tokens, for the peers' sake."""
        self._copy(copies)
        # the runner's forward is under inference_mode; an idle step's exchange must be too,
        # or the expert-load counters (inference tensors) refuse its in-place update
        with torch.inference_mode():
            return self.executor.execute(batch)

    def read_state(self, copies, slot: int, block_table: list[int], num_tokens: int) -> dict:
        self._copy(copies)
        return self.executor.read_state(slot, block_table, num_tokens)

    def write_state(self, copies, slot: int, block_table: list[int], tensors: dict) -> None:
        self._copy(copies)
        self.executor.write_state(slot, block_table, tensors)

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.executor.copy_slot(src, dst)

    @ray.method(concurrency_group=MONITOR)
    def ping(self) -> int:
        return self.rank

    @ray.method(concurrency_group=MONITOR)
    def expert_load(self):
        return self.executor.expert_load()

    @ray.method(concurrency_group=MONITOR)
    def info(self) -> dict:
        exchange = getattr(self.model, "expert_parallel", None)
        return {
            **(self.executor.info() if self.executor is not None else {}),
            "rank": self.rank,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "experts": self.expert_range,
            "expert_parallel_size": self.size,
            "torch_threads": torch.get_num_threads(),
            **(exchange.stats() if exchange is not None else {}),
        }
