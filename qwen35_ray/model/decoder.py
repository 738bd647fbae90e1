"""One decoder layer: pre-norm token mixer (GDN or gated attention), pre-norm channel mixer."""

import torch
from torch import nn

from qwen35_ray.model.attention import GatedAttention
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.expert_parallel import ExpertParallel
from qwen35_ray.model.gdn import GatedDeltaNet
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.mlp import MLP, SparseMoE
from qwen35_ray.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_type: str,
        cache_index: int,  # of its GDN slots or attention blocks in the HybridCache
        moe: bool,
        expert_parallel: ExpertParallel | None = None,
        kernels: KernelBackend = TORCH,
    ):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, cache_index, kernels)
        else:
            self.self_attn = GatedAttention(config, cache_index, kernels)
        if moe:
            self.mlp = SparseMoE(config, expert_parallel, kernels)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps, kernels)
        self.post_attention_layernorm = RMSNorm(H, eps, kernels)

    def fuse_projections(self) -> None:
        (
            self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        ).fuse_projections()
        self.mlp.fuse_projections()

    def forward(self, x: torch.Tensor, step, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden]; step: the step's cache access (model/step.py). With rows, the token
        mixer still runs (and writes its cache) at every position, the channel mixer only at
        those rows, which are all it returns: [len(rows), hidden]."""
        h = self.input_layernorm(x)
        mixer = self.linear_attn if self.layer_type == "linear_attention" else self.self_attn
        x = x + mixer(h, step)
        if rows is not None:
            x = x[rows]
            if not len(x):
                return x
        return x + self.mlp(self.post_attention_layernorm(x))
