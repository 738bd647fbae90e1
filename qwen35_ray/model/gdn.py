"""Gated DeltaNet token mixer (linear attention) over a flat varlen batch.

Legend: T = tokens, H/HV = key/value heads, K/V = their head dims, C = conv channels.
"""

import torch
from qwen35_kernels.conv1d import causal_conv1d_step
from qwen35_kernels.gdn import gated_delta_step, gdn_gating, prepare_qk
from torch import nn

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.linear import fuse_rows, project
from qwen35_ray.model.norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelBackend = TORCH):
        super().__init__()
        self.kernels = kernels
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

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        conv_state: torch.Tensor,  # [S, C, W-1] this layer's slots
        recurrent_state: torch.Tensor,  # [S, HV, K, V]
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv, z, b, a = self._project(x)
        decode, prefill = batch.parts
        D = decode.num_seqs if decode is not None else 0
        parts = []
        if decode is not None:
            parts.append(self._mix(qkv[:D], a[:D], b[:D], decode, conv_state, recurrent_state))
        if prefill is not None:
            parts.append(self._mix(qkv[D:], a[D:], b[D:], prefill, conv_state, recurrent_state))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        o = self.norm(o, z)
        return self.out_proj(o.reshape(T, -1))

    def _mix(self, qkv, a, b, batch: ForwardBatch, conv_state, recurrent_state):
        """Conv and gated delta rule over a batch that is all decodes or all prefill chunks."""
        T, ops = qkv.shape[0], self.kernels
        weight = self.conv1d.weight[:, 0, :]
        if batch.is_decode:
            qkv = ops.causal_conv1d_update(qkv, weight, conv_state, batch.state_indices)
        else:
            qkv = ops.causal_conv1d_varlen(
                qkv,
                weight,
                batch.cu_seqlens,
                conv_state,
                batch.state_indices,
                batch.has_initial_state,
            )
        q, k, v = qkv.split([self.H * self.K, self.H * self.K, self.HV * self.V], dim=-1)
        q, k = q.view(T, self.H, self.K), k.view(T, self.H, self.K)
        v = v.view(T, self.HV, self.V)
        # the decay and write strength come from a and b inside the rule (gdn_gating)
        gating = (a, b, self.A_log, self.dt_bias)
        if batch.is_decode:
            return ops.fused_recurrent_gated_delta_rule(
                q, k, v, *gating, recurrent_state, batch.state_indices
            )
        return ops.chunk_gated_delta_rule(
            q,
            k,
            v,
            *gating,
            batch.cu_seqlens,
            recurrent_state,
            batch.state_indices,
            batch.has_initial_state,
        )

    def decode_step(
        self,
        x: torch.Tensor,  # [B, hidden] one token per sequence
        conv: torch.Tensor,  # [B, C, W-1] each sequence's conv state
        recurrent: torch.Tensor,  # [B, HV, K, V] fp32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward() for one decode token per sequence, on states passed in and returned
        instead of slots written: (out [B, hidden], conv', recurrent'). For the compiled
        decode step, which must not write its inputs; it runs the PyTorch paths and exists
        only with the torch kernel backend."""
        B = x.shape[0]
        qkv, z, b, a = self._project(x)
        qkv, conv = causal_conv1d_step(qkv, self.conv1d.weight[:, 0, :], conv)
        q, k, v = qkv.split([self.H * self.K, self.H * self.K, self.HV * self.V], dim=-1)
        q, k = q.view(B, self.H, self.K), k.view(B, self.H, self.K)
        v = v.view(B, self.HV, self.V)
        g, beta = gdn_gating(a, b, self.A_log, self.dt_bias)
        q, k = prepare_qk(q, k, self.HV)
        o, recurrent = gated_delta_step(q, k, v.float(), g.exp(), beta, recurrent.float())
        o = self.norm(o.to(v.dtype), z)
        return self.out_proj(o.reshape(B, -1)), conv, recurrent
