"""Gated full attention: per-head q/k RMSNorm, partial RoPE, GQA over the paged KV cache, and
the output multiplied by sigmoid of a gate that q_proj produces beside the query.

Legend: T = tokens, Hq/Hkv = query/KV heads, D = head dim.
"""

import torch
from qwen35_kernels.rope import rope_inv_freq, yarn_inv_freq
from torch import nn

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.linear import fuse_rows, project
from qwen35_ray.model.norm import RMSNorm


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig, kv_index: int, kernels: KernelBackend = TORCH):
        super().__init__()
        self.kv_index = kv_index  # this layer's K/V blocks in the HybridCache
        self.Hq, self.Hkv = config.num_attention_heads, config.num_key_value_heads
        self.D = config.head_dim
        hidden = config.hidden_size
        # each head's query is followed by its gate: [Hq, 2D] once viewed per head
        self.q_proj = nn.Linear(hidden, self.Hq * self.D * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.Hkv * self.D, bias=False)
        self.v_proj = nn.Linear(hidden, self.Hkv * self.D, bias=False)
        self.o_proj = nn.Linear(self.Hq * self.D, hidden, bias=False)
        self.q_norm = RMSNorm(self.D, config.rms_norm_eps, kernels)
        self.k_norm = RMSNorm(self.D, config.rms_norm_eps, kernels)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        # YaRN's attention factor multiplies cos and sin (1.0 for plain RoPE)
        self.rope_scale = (
            1.0 if config.rope_scaling is None else config.rope_scaling.attention_factor
        )
        # which rotary frequencies turn with an image token's h and w (model/mrope.py)
        self.mrope_section = config.mrope_section
        self.scale = self.D**-0.5
        self.register_buffer("qkv_fused", None, persistent=False)

    def fuse_projections(self) -> None:
        self.qkv_fused = fuse_rows(self._in_projs())

    def _in_projs(self):
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:  # [T, hidden]
        """step: the step's cache access (model/step.py), this layer's K/V by kv_index."""
        T = x.shape[0]
        q, gate, k, v = self._project(x, step)
        o = step.attention(self.kv_index, q, k, v, self.scale)
        return self.o_proj(o.reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1)))

    def _project(self, x: torch.Tensor, step):
        """(q [T, Hq, D], gate [T, Hq, D], k, v [T, Hkv, D]): normed q and k, rotated by the
        step at each token's rotary position."""
        T = x.shape[0]
        q, k, v = project(x, self.qkv_fused, self._in_projs())
        q, gate = q.view(T, self.Hq, 2 * self.D).chunk(2, dim=-1)
        rope = (self.inv_freq, self.rope_scale, self.mrope_section)
        q = step.rope(self.q_norm(q), *rope)
        k = step.rope(self.k_norm(k.view(T, self.Hkv, self.D)), *rope)
        return q, gate, k, v.view(T, self.Hkv, self.D)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """The inverse frequencies [R/2] of the checkpoint's rope type (model/rope_config.py)."""
    s = config.rope_scaling
    if s is None:
        return rope_inv_freq(config.rotary_dim, config.rope_theta)
    return yarn_inv_freq(
        config.rotary_dim,
        config.rope_theta,
        s.factor,
        s.original_max_position_embeddings,
        s.beta_fast,
        s.beta_slow,
        s.truncate,
    )
