"""EPConfig: how many rank actors one engine spans and what each of them reserves."""

from dataclasses import dataclass

import torch

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class EPConfig:
    """size: ranks of the expert-parallel group (1: today's single process, no Ray).
    num_cpus / num_gpus: what each rank's placement-group bundle reserves; a rank runs
    max(1, int(num_cpus)) torch threads. placement_strategy: Ray's, for the group's bundles
    (STRICT_PACK keeps the all-to-all on one node)."""

    size: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    placement_strategy: str = "STRICT_PACK"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"expert_parallel_size={self.size!r} must be an integer >= 1")
        if not self.num_cpus > 0:
            raise ValueError(
                f"rank_num_cpus={self.num_cpus!r} must be > 0: each rank runs its share of "
                "every step on the CPU threads it reserves"
            )
        if not self.num_gpus >= 0:
            raise ValueError(f"rank_num_gpus={self.num_gpus!r} must be >= 0")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(
                f"placement_strategy={self.placement_strategy!r} is not one of "
                f"{', '.join(STRATEGIES)}"
            )

    def check(self, device: str, num_experts: int) -> None:
        """Raise ValueError, naming the setting, when this group cannot run the model there."""
        if self.size == 1:
            return
        kind = torch.device(device).type
        if kind == "cuda" and self.num_gpus < 1:
            raise ValueError(
                f"device={device!r} with expert_parallel_size={self.size} needs "
                f"rank_num_gpus >= 1 (one GPU per rank), got rank_num_gpus={self.num_gpus}"
            )
        if kind == "cpu" and self.num_gpus > 0:
            raise ValueError(
                f"rank_num_gpus={self.num_gpus} reserves GPUs that device='cpu' ranks never "
                "use; set rank_num_gpus=0 or device='cuda'"
            )
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r}: expert parallelism runs on cpu or cuda")
        if num_experts == 0:
            raise ValueError(
                f"expert_parallel_size={self.size} splits routed experts, and this model is "
                "dense; use expert_parallel_size=1"
            )
        if self.size > num_experts:
            raise ValueError(
                f"expert_parallel_size={self.size} exceeds the model's {num_experts} routed "
                "experts per layer; every rank must hold at least one"
            )


def check_speculative(size: int, speculative) -> None:
    """Raise ValueError when an expert-parallel group of `size` ranks is asked for speculative
    decoding: the MTP layer's routed experts are not sharded across ranks, so only a
    single-process engine (expert_parallel_size 1) can run the MTP head."""
    if size > 1 and speculative is not None:
        raise ValueError(
            f"speculative (MTP speculative decoding) needs expert_parallel_size=1, got "
            f"expert_parallel_size={size}: the MTP layer's experts are not sharded across ranks; "
            "drop speculative or set expert_parallel_size=1"
        )
