"""Gated full attention: per-head q/k RMSNorm, partial RoPE, GQA over the paged KV cache, and
the output multiplied by sigmoid of a gate that q_proj produces beside the query.

Legend: T = tokens, Hq/Hkv = query/KV heads, D = head dim.
"""

import torch
from qwen35_kernels.rope import apply_rope, rope_inv_freq, yarn_inv_freq
from torch import nn

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.decode_kv import DecodeKV
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.linear import fuse_rows, project
from qwen35_ray.model.norm import RMSNorm


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelBackend = TORCH):
        super().__init__()
        self.kernels = kernels
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
        self.scale = self.D**-0.5
        self.register_buffer("qkv_fused", None, persistent=False)

    def fuse_projections(self) -> None:
        self.qkv_fused = fuse_rows(self._in_projs())

    def _in_projs(self):
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        key_cache: torch.Tensor,  # [N, P, Hkv, D] this layer's blocks
        value_cache: torch.Tensor,
        decode_kv: DecodeKV | None = None,  # CPU decode reads K/V from here (torch kernels)
    ) -> torch.Tensor:
        T = x.shape[0]
        q, gate, k, v = self._project(x, batch.positions)
        self.kernels.write_kv(k, v, key_cache, value_cache, batch.slot_mapping)
        parts = []
        for p, (q_part, k_part, v_part) in self._split((q, k, v), batch):
            if p.max_q_len == 1 and decode_kv is not None:
                parts.append(self._decode(q_part, k_part, v_part, p, key_cache, value_cache,
                                          decode_kv))  # fmt: skip
                continue
            if decode_kv is not None:
                decode_kv.invalidate(p.state_indices.tolist())
            parts.append(
                self.kernels.paged_attention(
                    q_part,
                    key_cache,
                    value_cache,
                    p.block_tables,
                    p.cu_seqlens,
                    p.seq_lens,
                    self.scale,
                    p.max_q_len,
                )
            )
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.o_proj(o.reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1)))

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """(q [T, Hq, D], gate [T, Hq, D], k, v [T, Hkv, D]): normed and rotated q and k."""
        T = x.shape[0]
        q, k, v = project(x, self.qkv_fused, self._in_projs())
        q, gate = q.view(T, self.Hq, 2 * self.D).chunk(2, dim=-1)
        q = apply_rope(self.q_norm(q), positions, self.inv_freq, self.rope_scale)
        k = self.k_norm(k.view(T, self.Hkv, self.D))
        k = apply_rope(k, positions, self.inv_freq, self.rope_scale)
        return q, gate, k, v.view(T, self.Hkv, self.D)

    def decode_step(
        self,
        x: torch.Tensor,  # [B, hidden] one token per sequence
        positions: torch.Tensor,  # [B]
        K: torch.Tensor,  # [R, Hkv, n, D] earlier keys by state slot (DecodeKV)
        V: torch.Tensor,
        rows: torch.Tensor,  # [B] state slot of each sequence
        lengths: torch.Tensor,  # [R] earlier tokens of each slot
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward() for one decode token per sequence without writing any cache: (out
        [B, hidden], the new k and v [B, Hkv, D] for the caller to store). For the compiled
        CPU decode step, which exists only with the torch kernel backend."""
        B = x.shape[0]
        q, gate, k, v = self._project(x, positions)
        o = self.decode_attend(q, k, v, K, V, rows, lengths)
        return self.o_proj(o.reshape(B, -1) * torch.sigmoid(gate.reshape(B, -1))), k, v

    def _decode(self, q, k, v, batch: ForwardBatch, key_cache, value_cache, decode_kv: DecodeKV):
        """CPU decode, one query per sequence, over the contiguous copies of DecodeKV: nothing
        gathered from the blocks unless a copy is stale."""
        slots, positions = batch.state_indices.tolist(), batch.positions.tolist()
        decode_kv.refill(slots, positions, batch.block_tables, key_cache, value_cache)
        rows, lengths, n = decode_rows(slots, positions)
        K, V = decode_kv.key[:rows, :, :n], decode_kv.value[:rows, :, :n]
        o = self.decode_attend(q, k, v, K, V, batch.state_indices, lengths)
        decode_kv.append(k, v, slots, positions)
        return o

    def decode_attend(
        self,
        q: torch.Tensor,  # [B, Hq, D] one query per sequence
        k: torch.Tensor,  # [B, Hkv, D] its own key and value
        v: torch.Tensor,
        K: torch.Tensor,  # [R, Hkv, n, D] earlier keys, one row per state slot
        V: torch.Tensor,
        rows: torch.Tensor,  # [B] each sequence's row in K and V
        lengths: torch.Tensor,  # [R] earlier tokens of each row
    ) -> torch.Tensor:
        """Attention of each new token over its sequence's earlier tokens and itself, [B, Hq, D]:
        one masked matmul for all rows and heads. Rows of slots outside the batch compute
        values nobody reads. Nothing is written, so a compiled decode step can use it."""
        B, Hkv, D = q.shape[0], self.Hkv, self.D
        R, n = K.shape[0], K.shape[2]
        qs = q.new_zeros(R, Hkv, self.Hq // Hkv, D).index_copy(0, rows, q.view(B, Hkv, -1, D))
        kn = k.new_zeros(R, Hkv, 1, D).index_copy(0, rows, k[:, :, None])
        vn = v.new_zeros(R, Hkv, 1, D).index_copy(0, rows, v[:, :, None])
        past = torch.arange(n, device=q.device) < lengths[:, None, None, None]  # [R, 1, 1, n]
        old = (qs @ K.to(q.dtype).transpose(-1, -2)) * self.scale
        old = old.masked_fill(~past, float("-inf"))  # [R, Hkv, G, n]
        new = (qs @ kn.transpose(-1, -2)) * self.scale  # [R, Hkv, G, 1]
        p = torch.cat([old, new], dim=-1).float().softmax(-1).to(q.dtype)
        o = p[..., :n] @ V.to(q.dtype) + p[..., n:] * vn  # [R, Hkv, G, D]
        return o.index_select(0, rows).reshape(B, self.Hq, D)

    @staticmethod
    def _split(tensors: tuple[torch.Tensor, ...], batch: ForwardBatch):
        decode, prefill = batch.parts
        D = decode.num_seqs if decode is not None else 0
        if decode is not None:
            yield decode, tuple(t[:D] for t in tensors)
        if prefill is not None:
            yield prefill, tuple(t[D:] for t in tensors)


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


def decode_rows(slots: list[int], positions: list[int]) -> tuple[int, torch.Tensor, int]:
    """For decode_attend over DecodeKV: the rows to read (up to the highest slot), the earlier
    tokens of each row (the slot's position; rows outside the batch see all n) and n, the
    longest (at least 1)."""
    rows, n = max(slots) + 1, max(max(positions), 1)
    lengths = torch.full((rows,), n)
    lengths[slots] = torch.tensor(positions)
    return rows, lengths, n
