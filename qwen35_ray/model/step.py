"""The step a forward runs in: how its token mixers read and write the per-request state.

Every module has one forward, and it reaches the cache only through the step it is given:
`step.conv`, `step.delta_rule` and `step.attention`, each named by the layer's index in the
HybridCache. The ops come from the model's KernelBackend, chosen when it was built; the step
object, chosen once per step outside any graph (`make_step`), decides where states live:

- PagedStep: any batch, any backend. GDN states are updated in their slots and K/V written to
  the paged blocks in place; decodes and prefill chunks run their own kernels. What CUDA graphs
  capture on a GPU, and what every mixed step runs.
- SlotDecode: a batch of decodes on CPU with the torch kernels (the cache keeps DecodeKV
  copies). It reads the slots and the contiguous K/V copies and writes nothing: the new states
  and K/V are returned (`outputs`) and stored by `store_slot_decode`. So torch.compile can take
  the whole step as one graph (engine/decode_graph.py), and the eager step runs the same code.

Legend: T = tokens, B = sequences, R = DecodeKV rows read, n = their tokens.
"""

from dataclasses import dataclass, field

import torch
from qwen35_kernels.attention import write_kv
from qwen35_kernels.conv1d import causal_conv1d_step
from qwen35_kernels.gdn import gated_delta_step, gdn_gating, prepare_qk
from qwen35_kernels.rope import apply_rope

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.decode_kv import decode_attention, decode_rows
from qwen35_ray.model.kernel_backend import KernelBackend
from qwen35_ray.model.mrope import apply_mrope


class PagedStep:
    """The cache written in place: GDN slots and paged K/V blocks (with the DecodeKV copies
    for the decodes of a CPU cache that keeps them)."""

    def __init__(self, batch: ForwardBatch, cache: HybridCache, kernels: KernelBackend):
        self.batch, self.cache, self.ops = batch, cache, kernels
        rope = batch.rope_positions
        self.rope_positions = batch.positions if rope is None else rope

    def rope(self, x: torch.Tensor, inv_freq, scale: float, mrope_section) -> torch.Tensor:
        """x [T, H, D] rotated at each token's rotary position: multimodal (t, h, w) when a
        chunk of the step holds image tokens, else index + the sequence's rope delta."""
        if self.batch.mrope_positions is not None:
            return apply_mrope(x, self.batch.mrope_positions, inv_freq, mrope_section, scale)
        return apply_rope(x, self.rope_positions, inv_freq, scale)

    def conv(self, layer: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """silu(causal depthwise conv) of x [T, C] with the layer's conv state slots."""
        ops, state = self.ops, self.cache.conv[layer]

        def part(p: ForwardBatch, x):
            if p.is_decode:
                return ops.causal_conv1d_update(x, weight, state, p.state_indices)
            return ops.causal_conv1d_varlen(
                x, weight, p.cu_seqlens, state, p.state_indices, p.has_initial_state
            )

        return self._by_part(part, x)

    def delta_rule(self, layer: int, q, k, v, a, b, A_log, dt_bias) -> torch.Tensor:
        """The gated delta rule over the layer's recurrent state slots: o [T, HV, V]. q, k
        [T, H, K], v [T, HV, V]; a, b [T, HV] give the decay and write strength."""
        ops, state = self.ops, self.cache.recurrent[layer]

        def part(p: ForwardBatch, q, k, v, a, b):
            if p.is_decode:
                return ops.fused_recurrent_gated_delta_rule(
                    q, k, v, a, b, A_log, dt_bias, state, p.state_indices
                )
            return ops.chunk_gated_delta_rule(
                q, k, v, a, b, A_log, dt_bias, p.cu_seqlens, state, p.state_indices,
                p.has_initial_state,
            )  # fmt: skip

        return self._by_part(part, q, k, v, a, b)

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [T, Hq, D] over the sequences' earlier K/V and the new k, v [T, Hkv, D], which
        are written to the layer's blocks first: o [T, Hq, D]."""
        ops, cache, batch = self.ops, self.cache, self.batch
        key, value = cache.key[layer], cache.value[layer]
        ops.write_kv(k, v, key, value, batch.slot_mapping)
        copy = cache.decode_kv_of(layer)

        def part(p: ForwardBatch, q, k, v):
            if copy is not None and p.is_decode:
                return copy.decode(q, k, v, p, key, value, scale)
            if copy is not None:
                copy.invalidate(p.state_indices.tolist())
            return ops.paged_attention(
                q, key, value, p.block_tables, p.cu_seqlens, p.seq_lens, scale, p.max_q_len
            )

        return self._by_part(part, q, k, v)

    def _by_part(self, fn, *tensors: torch.Tensor) -> torch.Tensor:
        """fn over the decode part and the prefill part of the batch (rows split after the
        decodes, which lead), concatenated."""
        decode, prefill = self.batch.parts
        D = decode.num_seqs if decode is not None else 0
        outs = []
        if decode is not None:
            outs.append(fn(decode, *(t[:D] for t in tensors)))
        if prefill is not None:
            outs.append(fn(prefill, *(t[D:] for t in tensors)))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass
class SlotDecode:
    """One decode token per sequence on CPU, writing nothing: the states are read where they
    are (by `rows`) and the new ones collected, per layer in cache order, for `outputs`."""

    positions: torch.Tensor  # [B] rotary positions: index + the sequence's rope delta
    rows: torch.Tensor  # [B] state slot of each sequence, its row in keys/values
    lengths: torch.Tensor  # [R] earlier tokens of each row
    conv_slots: torch.Tensor  # [n_gdn, S, C, W-1]
    recurrent_slots: torch.Tensor  # [n_gdn, S, HV, K, V] fp32
    keys: list[torch.Tensor]  # per attention layer [R, Hkv, n, D] (DecodeKV)
    values: list[torch.Tensor]
    new: dict[str, list[torch.Tensor]] = field(
        default_factory=lambda: {"conv": [], "recurrent": [], "k": [], "v": []}
    )

    def rope(self, x: torch.Tensor, inv_freq, scale: float, mrope_section) -> torch.Tensor:
        # a decode is past its prompt's images: equal positions on every axis, plain RoPE
        return apply_rope(x, self.positions, inv_freq, scale)

    def conv(self, layer: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y, state = causal_conv1d_step(x, weight, self.conv_slots[layer][self.rows])
        self.new["conv"].append(state)
        return y

    def delta_rule(self, layer: int, q, k, v, a, b, A_log, dt_bias) -> torch.Tensor:
        g, beta = gdn_gating(a, b, A_log, dt_bias)
        q, k = prepare_qk(q, k, v.shape[1])
        state = self.recurrent_slots[layer][self.rows].float()
        o, state = gated_delta_step(q, k, v.float(), g.exp(), beta, state)
        self.new["recurrent"].append(state)
        return o.to(v.dtype)

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        self.new["k"].append(k)
        self.new["v"].append(v)
        K, V = self.keys[layer], self.values[layer]
        return decode_attention(q, k, v, K, V, self.rows, self.lengths, scale)

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """(conv [n_gdn, B, C, W-1], recurrent [n_gdn, B, HV, K, V], k, v [n_attn, B, Hkv,
        D]): the batch's new states, for store_slot_decode."""
        return tuple(torch.stack(self.new[name]) for name in ("conv", "recurrent", "k", "v"))


def slot_decode_inputs(batch: ForwardBatch, cache: HybridCache, n_attn: int) -> tuple:
    """SlotDecode's tensors for a batch of decodes (batch.is_decode): the DecodeKV copies of
    the first n_attn attention layers refilled where stale, and (positions, rows, lengths,
    conv slots, recurrent slots, keys, values); positions are the rotary ones, the DecodeKV
    rows and lengths come from the token indices."""
    slots, positions = batch.state_indices.tolist(), batch.positions.tolist()
    copies = cache.decode_kv[:n_attn]
    for j, d in enumerate(copies):
        d.refill(slots, positions, batch.block_tables, cache.key[j], cache.value[j])
    rows, lengths, n = decode_rows(slots, positions)
    keys = [d.key[:rows, :, :n] for d in copies]
    values = [d.value[:rows, :, :n] for d in copies]
    rope = batch.positions if batch.rope_positions is None else batch.rope_positions
    return (rope, batch.state_indices, lengths, cache.conv, cache.recurrent, keys,
            values)  # fmt: skip


def store_slot_decode(batch: ForwardBatch, cache: HybridCache, outputs: tuple) -> None:
    """Store what a SlotDecode step returned: GDN states into their slots, the new K/V into
    the paged blocks and the DecodeKV copies."""
    conv, recurrent, k, v = outputs
    idx = batch.state_indices
    cache.conv[:, idx] = conv
    cache.recurrent[:, idx] = recurrent
    slots, positions = batch.state_indices.tolist(), batch.positions.tolist()
    for j in range(k.shape[0]):
        write_kv(k[j], v[j], cache.key[j], cache.value[j], batch.slot_mapping)
        cache.decode_kv[j].append(k[j], v[j], slots, positions)


def slot_decodes(batch: ForwardBatch, cache: HybridCache) -> bool:
    """The step runs as a SlotDecode: all decodes, on a cache with DecodeKV copies (CPU, the
    torch kernels), none at multimodal positions (a one-token chunk of an image's tokens)."""
    return bool(cache.decode_kv) and batch.is_decode and batch.mrope_positions is None
