"""One decoder layer: pre-norm token mixer (GDN or gated attention), pre-norm channel mixer."""

import torch
from torch import nn

from qwen35_ray.model.attention import GatedAttention
from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.decode_kv import DecodeKV
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
        moe: bool,
        expert_parallel: ExpertParallel | None = None,
        kernels: KernelBackend = TORCH,
    ):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config, kernels)
        else:
            self.self_attn = GatedAttention(config, kernels)
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

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        cache_a: torch.Tensor,  # conv state slots (GDN) or key blocks (attention)
        cache_b: torch.Tensor,  # recurrent state slots (GDN) or value blocks (attention)
        decode_kv: DecodeKV | None = None,  # attention: the CPU decode copy of K/V
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, batch, cache_a, cache_b)
        else:
            h = self.self_attn(h, batch, cache_a, cache_b, decode_kv)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_step(self, x, positions, rows, lengths, state_a, state_b):
        """forward() for one decode token per sequence on states passed in and returned (see
        GatedDeltaNet.decode_step and GatedAttention.decode_step): (x, new_a, new_b)."""
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h, new_a, new_b = self.linear_attn.decode_step(h, state_a, state_b)
        else:
            h, new_a, new_b = self.self_attn.decode_step(h, positions, state_a, state_b, rows,
                                                         lengths)  # fmt: skip
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_a, new_b
