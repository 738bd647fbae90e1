"""Gated DeltaNet token mixer (linear attention) over a flat varlen batch.

Legend: T = tokens, H/HV = key/value heads, K/V = their head dims, C = conv channels.
"""

import torch
from torch import nn

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.linear import fuse_rows, project
from qwen35_ray.model.norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, state_index: int, kernels: KernelBackend = TORCH):
        super().__init__()
        self.state_index = state_index  # this layer's conv and recurrent slots in the HybridCache
        self.H, self.HV = config.linear_num_key_heads, config.linear_num_value_heads
        self.K, self.V = config.linear_key_head_dim, config.linear_value_head_dim
        hidden, C, W = config.hidden_size, config.conv_dim, config.linear_conv_kernel_dim
        self.in_proj_qkv = nn.Linear(hidden, C, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.HV * self.V, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.HV, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.HV, bias=False)
        # stored as the checkpoint's nn.Conv1d weight [C, 1, W]
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.zeros(C, 1, W))
        self.A_log = nn.Parameter(torch.zeros(self.HV))
        self.dt_bias = nn.Parameter(torch.ones(self.HV))
        self.norm = GatedRMSNorm(self.V, config.rms_norm_eps, kernels)
        self.out_proj = nn.Linear(self.HV * self.V, hidden, bias=False)
        self.register_buffer("in_proj_fused", None, persistent=False)

    def fuse_projections(self) -> None:
        self.in_proj_fused = fuse_rows(self._in_projs())

    def _in_projs(self):
        return [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]

    def _project(self, x: torch.Tensor):
        """(qkv [T, C], z [T, HV, V], b, a [T, HV])"""
        qkv, z, b, a = project(x, self.in_proj_fused, self._in_projs())
        return qkv, z.view(-1, self.HV, self.V), b, a

    def forward(self, x: torch.Tensor, step) -> torch.Tensor:  # [T, hidden]
        """step: the step's cache access (model/step.py), this layer's states by state_index."""
        T = x.shape[0]
        qkv, z, b, a = self._project(x)
        qkv = step.conv(self.state_index, qkv, self.conv1d.weight[:, 0, :])
        q, k, v = qkv.split([self.H * self.K, self.H * self.K, self.HV * self.V], dim=-1)
        q, k = q.view(T, self.H, self.K), k.view(T, self.H, self.K)
        # the decay and write strength come from a and b inside the rule (gdn_gating)
        o = step.delta_rule(self.state_index, q, k, v.view(T, self.HV, self.V), a, b,
                            self.A_log, self.dt_bias)  # fmt: skip
        o = self.norm(o, z)
        return self.out_proj(o.reshape(T, -1))
