"""Multi-token prediction head: one extra full-attention decoder layer that drafts token t+2.

It reads the main model's final hidden state at position t and the embedding of token t+1,
normalises each, projects their concatenation back to the hidden size (`fc`), and runs its own
decoder layer (own KV cache, same MoE kind as the main layers) and norm.
"""

import torch
from torch import nn

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.decoder import DecoderLayer
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.norm import RMSNorm


class MultiTokenPredictor(nn.Module):
    def __init__(self, config: ModelConfig, first_kv: int, kernels: KernelBackend = TORCH):
        """first_kv: the index of its first KV cache in the HybridCache."""
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        moe = config.num_experts > 0
        self.pre_fc_norm_embedding = RMSNorm(H, eps, kernels)
        self.pre_fc_norm_hidden = RMSNorm(H, eps, kernels)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, "full_attention", first_kv + i, moe, kernels=kernels)
            for i in range(config.mtp_num_hidden_layers)
        )
        self.norm = RMSNorm(H, eps, kernels)

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H]
        hidden: torch.Tensor,  # [T, H]
        step,  # the step's cache access (model/step.py)
        rows: torch.Tensor | None = None,  # [R] the positions whose output is wanted
    ) -> torch.Tensor:
        """The head's output hidden states [T, H], or [R, H] at `rows` only. Every position's
        K/V is written either way, but with rows the last layer's MLP (the MoE, most of a
        prompt's pass) runs over those rows alone: a prompt's pass needs its K/V everywhere
        and its output at the last position."""
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], -1)
        x = self.fc(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, step, rows if i == last else None)
        return self.norm(x)
