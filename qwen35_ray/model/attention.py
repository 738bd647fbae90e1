"""Gated full attention: per-head q/k RMSNorm, partial RoPE, GQA over the paged KV cache, and
the output multiplied by sigmoid of a gate that q_proj produces beside the query.

Legend: T = tokens, Hq/Hkv = query/KV heads, D = head dim.
"""

import torch
from qwen35_kernels.attention import paged_attention, write_kv
from qwen35_kernels.rope import apply_rope, rope_inv_freq
from torch import nn

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.norm import RMSNorm


class GatedAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.Hq, self.Hkv = config.num_attention_heads, config.num_key_value_heads
        self.D = config.head_dim
        hidden = config.hidden_size
        # each head's query is followed by its gate: [Hq, 2D] once viewed per head
        self.q_proj = nn.Linear(hidden, self.Hq * self.D * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.Hkv * self.D, bias=False)
        self.v_proj = nn.Linear(hidden, self.Hkv * self.D, bias=False)
        self.o_proj = nn.Linear(self.Hq * self.D, hidden, bias=False)
        self.q_norm = RMSNorm(self.D, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.D, config.rms_norm_eps)
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.rotary_dim, config.rope_theta), persistent=False
        )
        self.scale = self.D**-0.5
        self._kv_buf = torch.empty(0)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        key_cache: torch.Tensor,  # [N, P, Hkv, D] this layer's blocks
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, gate = self.q_proj(x).view(T, self.Hq, 2 * self.D).chunk(2, dim=-1)
        q = apply_rope(self.q_norm(q), batch.positions, self.inv_freq)
        k = self.k_norm(self.k_proj(x).view(T, self.Hkv, self.D))
        k = apply_rope(k, batch.positions, self.inv_freq)
        v = self.v_proj(x).view(T, self.Hkv, self.D)
        write_kv(k, v, key_cache, value_cache, batch.slot_mapping)
        parts = [
            self._decode(q_part, key_cache, value_cache, p)
            if p.max_q_len == 1 and not q.is_cuda
            else paged_attention(
                q_part,
                key_cache,
                value_cache,
                p.block_tables,
                p.cu_seqlens,
                p.seq_lens,
                self.scale,
                p.max_q_len,
            )
            for p, q_part in self._split(q, batch)
        ]
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        o = o.reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1))
        return self.o_proj(o)

    def _decode(self, q, key_cache, value_cache, batch: ForwardBatch) -> torch.Tensor:
        """CPU decode, one query per sequence: per KV head, all sequences' keys and values
        gathered at once (the slots of batch.decode_kv) into contiguous [B, n, D] buffers, then
        one masked matmul for the head's G query heads."""
        B, Hkv, D = q.shape[0], self.Hkv, self.D
        slots, mask = batch.decode_kv  # [B * n], [B, 1, n]
        buf = self._buffer(2 * Hkv * slots.shape[0] * D, key_cache.dtype)
        buf = buf[: 2 * Hkv * slots.shape[0] * D].view(2, Hkv, slots.shape[0], D)
        qg = q.view(B, Hkv, -1, D)  # [B, Hkv, G, D]
        mask = mask.to(q.dtype)
        out = []
        for h in range(Hkv):
            k = torch.index_select(key_cache.view(-1, Hkv, D)[:, h], 0, slots, out=buf[0, h])
            v = torch.index_select(value_cache.view(-1, Hkv, D)[:, h], 0, slots, out=buf[1, h])
            k, v = k.view(B, -1, D).to(q.dtype), v.view(B, -1, D).to(q.dtype)
            scores = torch.baddbmm(mask, qg[:, h], k.transpose(1, 2), alpha=self.scale)
            out.append(scores.float().softmax(-1).to(q.dtype) @ v)  # [B, G, D]
        return torch.stack(out, dim=1).view(B, self.Hq, D)

    def _buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The decode gather buffer, reused across steps: a fresh multi-MiB tensor per layer
        and step costs more in page faults than the gather itself."""
        buf = self._kv_buf
        # a buffer made under inference mode cannot be written outside it, and the reverse
        if (
            buf.numel() < numel
            or buf.dtype != dtype
            or buf.is_inference() != torch.is_inference_mode_enabled()
        ):
            self._kv_buf = buf = torch.empty(numel, dtype=dtype, device=self.inv_freq.device)
        return buf

    @staticmethod
    def _split(q: torch.Tensor, batch: ForwardBatch):
        decode, prefill = batch.parts
        D = decode.num_seqs if decode is not None else 0
        if decode is not None:
            yield decode, q[:D]
        if prefill is not None:
            yield prefill, q[D:]
