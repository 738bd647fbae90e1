"""Channel mixers: the dense SwiGLU MLP and the sparse MoE with a gated shared expert.

Legend: T = tokens, E = experts (E_local: those this rank holds), I = expert width.
"""

import torch
import torch.nn.functional as F
from torch import nn

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.expert_parallel import ExpertParallel
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.linear import fuse_rows, project


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.register_buffer("gate_up_fused", None, persistent=False)

    def fuse_projections(self) -> None:
        self.gate_up_fused = fuse_rows([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_up_fused, [self.gate_proj, self.up_proj])
        return self.down(gate, up)

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """Routed experts stored fused, as the BF16 checkpoints do: all of them, or under expert
    parallelism this rank's contiguous range."""

    def __init__(self, config: ModelConfig, num_local: int | None = None):
        super().__init__()
        E = config.num_experts if num_local is None else num_local
        I, H = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, H))  # gate rows first
        self.down_proj = nn.Parameter(torch.zeros(E, H, I))


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))


class SparseMoE(nn.Module):
    """Router, routed experts and gated shared expert. With `expert_parallel` this rank holds
    only its shard of the routed experts and reaches the others through it; the router and
    the shared expert stay whole on every rank."""

    def __init__(
        self,
        config: ModelConfig,
        expert_parallel: ExpertParallel | None = None,
        kernels: KernelBackend = TORCH,
    ):
        super().__init__()
        self.kernels = kernels
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = Router(config)
        local = None if expert_parallel is None else expert_parallel.shard.num_local
        self.experts = Experts(config, local)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.register_buffer("in_fused", None, persistent=False)
        # the routed experts' backend, chosen once: same call either way (an ExpertParallel
        # runs its shard with the same kernels)
        self.routed = kernels.fused_moe if expert_parallel is None else expert_parallel
        # [E] int64 routed pairs per expert, installed by ExpertLoad on the layers it tracks
        self.register_buffer("expert_counts", None, persistent=False)

    def fuse_projections(self) -> None:
        # the shared expert's own gate/up stay unfused: this covers them
        self.in_fused = fuse_rows(self._in_projs())

    def _in_projs(self):
        s = self.shared_expert
        return [self.gate, self.shared_expert_gate, s.gate_proj, s.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]
        logits, shared_gate, gate, up = project(x, self.in_fused, self._in_projs())
        weights, ids = self.kernels.topk_softmax(logits, self.top_k, self.renormalize)
        if self.expert_counts is not None:
            flat = ids.reshape(-1)
            self.expert_counts.index_add_(0, flat, torch.ones_like(flat))
        routed = self.routed(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return routed + torch.sigmoid(shared_gate) * self.shared_expert.down(gate, up)

    def idle(self) -> None:
        """The routed experts' exchange with no tokens of this rank: under expert parallelism
        the other ranks' tokens may still need this rank's experts."""
        w = self.experts.down_proj
        x = w.new_zeros(0, w.shape[1])
        ids = torch.zeros(0, self.top_k, dtype=torch.int64, device=w.device)
        self.routed(x, self.experts.gate_up_proj, w, x.new_zeros(0, self.top_k), ids)
