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
from qwen35_ray.model.decode_kv import DecodeKV
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

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        batch: ForwardBatch,
        key_cache: torch.Tensor,  # [N, P, Hkv, D] this layer's blocks
        value_cache: torch.Tensor,
        decode_kv: DecodeKV | None = None,  # CPU decode reads K/V from here
    ) -> torch.Tensor:
        T = x.shape[0]
        q, gate = self.q_proj(x).view(T, self.Hq, 2 * self.D).chunk(2, dim=-1)
        q = apply_rope(self.q_norm(q), batch.positions, self.inv_freq)
        k = self.k_norm(self.k_proj(x).view(T, self.Hkv, self.D))
        k = apply_rope(k, batch.positions, self.inv_freq)
        v = self.v_proj(x).view(T, self.Hkv, self.D)
        write_kv(k, v, key_cache, value_cache, batch.slot_mapping)
        parts = []
        for p, (q_part, k_part, v_part) in self._split((q, k, v), batch):
            if p.max_q_len == 1 and decode_kv is not None:
                parts.append(self._decode(q_part, k_part, v_part, p, key_cache, value_cache,
                                          decode_kv))  # fmt: skip
                continue
            if decode_kv is not None:
                decode_kv.invalidate(p.state_indices.tolist())
            parts.append(
                paged_attention(
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
        o = o.reshape(T, -1) * torch.sigmoid(gate.reshape(T, -1))
        return self.o_proj(o)

    def _decode(self, q, k, v, batch: ForwardBatch, key_cache, value_cache, decode_kv: DecodeKV):
        """CPU decode, one query per sequence, over the contiguous copies of DecodeKV: one
        masked matmul per step for all sequences and heads, nothing gathered. Rows run by
        state slot up to the highest one in the batch; slots not in the batch compute rows
        nobody reads."""
        B, Hkv, D = q.shape[0], self.Hkv, self.D
        slots = batch.state_indices.tolist()
        n = decode_kv.append(
            k, v, slots, batch.positions.tolist(), batch.block_tables, key_cache, value_cache
        )
        rows = max(slots) + 1
        K, V = decode_kv.key[:rows, :, :n], decode_kv.value[:rows, :, :n]  # [R, Hkv, n, D]
        qs = q.new_zeros(rows, Hkv, self.Hq // Hkv, D)
        qs[batch.state_indices] = q.view(B, Hkv, -1, D).to(qs.dtype)
        # -inf past each sequence's end; rows of other slots see everything (finite values)
        lengths = torch.full((rows,), n)
        lengths[batch.state_indices] = batch.seq_lens.to(lengths.dtype)
        mask = torch.zeros(rows, 1, 1, n).masked_fill_(
            torch.arange(n)[None, None, None, :] >= lengths[:, None, None, None], float("-inf")
        )
        scores = torch.matmul(qs, K.to(q.dtype).transpose(-1, -2)) * self.scale + mask
        o = scores.float().softmax(-1).to(q.dtype) @ V.to(q.dtype)  # [R, Hkv, G, D]
        return o[batch.state_indices].reshape(B, self.Hq, D)

    @staticmethod
    def _split(tensors: tuple[torch.Tensor, ...], batch: ForwardBatch):
        decode, prefill = batch.parts
        D = decode.num_seqs if decode is not None else 0
        if decode is not None:
            yield decode, tuple(t[:D] for t in tensors)
        if prefill is not None:
            yield prefill, tuple(t[D:] for t in tensors)
