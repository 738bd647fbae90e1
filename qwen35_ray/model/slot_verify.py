"""SlotVerify: speculative decoding's verification step on CPU, writing nothing (issue 22).

What SlotDecode (model/step.py) is to a decode step, this is to VerifyStep (model/verify.py):
each sequence runs `width` tokens after its cached ones (its last token and its drafts), reading
its GDN states from their slots and its earlier K/V from the DecodeKV copies, and returns what
it computed instead of writing it: the GDN states after every position and the new K/V. So
torch.compile can take the whole step as one graph (engine/verify_graph.py), and the eager step
runs the same code. `store_slot_verify` then writes, once the kept counts are known, the states
of each sequence's last kept position into its slots, the K/V of every position into the paged
blocks, and the kept positions' K/V into DecodeKV.

Legend: B = sequences, w = width, T = B * w tokens, R = DecodeKV rows read, n = their tokens,
G = query heads per KV head.
"""

from dataclasses import dataclass, field

import torch
from qwen35_kernels.attention import write_kv
from qwen35_kernels.conv1d import causal_conv1d_step
from qwen35_kernels.gdn import gated_delta_step, gdn_gating, prepare_qk
from qwen35_kernels.rope import apply_rope

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.decode_kv import decode_rows


@dataclass
class SlotVerify:
    width: int
    positions: torch.Tensor  # [T] rotary positions
    rows: torch.Tensor  # [B] state slot of each sequence, its row in keys/values
    lengths: torch.Tensor  # [R] earlier tokens of each row
    conv_slots: torch.Tensor  # [n_gdn, S, C, W-1]
    recurrent_slots: torch.Tensor  # [n_gdn, S, HV, K, V] fp32
    keys: list[torch.Tensor]  # per attention layer [R, Hkv, n, D] (DecodeKV)
    values: list[torch.Tensor]
    layer0: int = 0  # the cache index of keys[0] (the MTP layer's, for the head's steps)
    new: dict[str, list[torch.Tensor]] = field(
        default_factory=lambda: {"conv": [], "recurrent": [], "k": [], "v": []}
    )

    def _seqs(self, t: torch.Tensor) -> torch.Tensor:  # [T, ...] -> [B, w, ...]
        return t.unflatten(0, (-1, self.width))

    def rope(self, x: torch.Tensor, inv_freq, scale: float, mrope_section) -> torch.Tensor:
        # past the prompt's images: equal positions on every axis, plain RoPE
        return apply_rope(x, self.positions, inv_freq, scale)

    def conv(self, layer: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        state = self.conv_slots[layer][self.rows]
        xs, ys, kept = self._seqs(x), [], []
        for i in range(self.width):
            y, state = causal_conv1d_step(xs[:, i], weight, state)
            ys.append(y)
            kept.append(state)
        self.new["conv"].append(kept)
        return torch.stack(ys, 1).flatten(0, 1)

    def delta_rule(self, layer: int, q, k, v, a, b, A_log, dt_bias) -> torch.Tensor:
        g, beta = gdn_gating(a, b, A_log, dt_bias)
        q, k = prepare_qk(q, k, v.shape[1])
        q, k, vs, decay, beta = (self._seqs(t) for t in (q, k, v.float(), g.exp(), beta))
        state = self.recurrent_slots[layer][self.rows].float()
        outs, kept = [], []
        for i in range(self.width):
            o, state = gated_delta_step(q[:, i], k[:, i], vs[:, i], decay[:, i], beta[:, i], state)
            outs.append(o)
            kept.append(state)
        self.new["recurrent"].append(kept)
        return torch.stack(outs, 1).flatten(0, 1).to(v.dtype)

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        self.new["k"].append(k)
        self.new["v"].append(v)
        K, V = self.keys[layer - self.layer0], self.values[layer - self.layer0]
        return verify_attention(q, k, v, K, V, self.rows, self.lengths, scale, self.width)

    def outputs(self) -> tuple[torch.Tensor, ...]:
        """(conv [n_gdn, B, w, C, W-1], recurrent [n_gdn, B, w, HV, K, V], k, v [n_attn, T,
        Hkv, D]): the states after every position, and the new K/V."""
        conv, rec = ([torch.stack(s, 1) for s in self.new[n]] for n in ("conv", "recurrent"))
        k, v = torch.stack(self.new["k"]), torch.stack(self.new["v"])
        return torch.stack(conv), torch.stack(rec), k, v

    def states_at(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv [n_gdn, B, C, W-1], recurrent [n_gdn, B, HV, K, V]): each sequence's GDN
        states after its position last[b], picked position by position, so that a compiled
        step neither writes every position's states nor reads them back (which stacking them
        and indexing would)."""

        def pick(kept: list[torch.Tensor]) -> torch.Tensor:
            at = last.view(-1, *[1] * (kept[0].dim() - 1))
            out = kept[0]
            for i in range(1, len(kept)):
                out = torch.where(at == i, kept[i], out)
            return out

        conv, rec = ([pick(s) for s in self.new[n]] for n in ("conv", "recurrent"))
        return torch.stack(conv), torch.stack(rec)


def verify_attention(
    q: torch.Tensor,  # [T, Hq, D] w queries per sequence
    k: torch.Tensor,  # [T, Hkv, D] their own keys and values
    v: torch.Tensor,
    K: torch.Tensor,  # [R, Hkv, n, D] earlier keys, one row per state slot
    V: torch.Tensor,
    rows: torch.Tensor,  # [B] each sequence's row in K and V
    lengths: torch.Tensor,  # [R] earlier tokens of each row
    scale: float,
    width: int,
) -> torch.Tensor:
    """Each new token over its sequence's earlier tokens and the new ones up to itself: [T,
    Hq, D]. Nothing is written, so a compiled step can use it."""
    T, Hq, D = q.shape
    Hkv, w = k.shape[1], width
    G = Hq // Hkv
    qs = q.view(-1, w, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(-1, Hkv, w * G, D)
    kn = k.view(-1, w, Hkv, D).transpose(1, 2)  # [B, Hkv, w, D]
    vn = v.view(-1, w, Hkv, D).transpose(1, 2)
    Kb, Vb = K.index_select(0, rows).to(q.dtype), V.index_select(0, rows).to(q.dtype)
    n = K.shape[2]
    past = torch.arange(n, device=q.device) < lengths[rows][:, None, None, None]  # [B,1,1,n]
    old = (qs @ Kb.transpose(-1, -2)) * scale  # [B, Hkv, w*G, n]
    old = old.masked_fill(~past, float("-inf"))
    i = torch.arange(w * G, device=q.device) // G
    causal = torch.arange(w, device=q.device)[None, :] <= i[:, None]  # [w*G, w]
    new = ((qs @ kn.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))
    p = torch.cat([old, new], dim=-1).float().softmax(-1).to(q.dtype)
    o = p[..., :n] @ Vb + p[..., n:] @ vn  # [B, Hkv, w*G, D]
    return o.view(-1, Hkv, w, G, D).permute(0, 2, 1, 3, 4).reshape(T, Hq, D)


def slot_verify_inputs(batch: ForwardBatch, cache: HybridCache, n_attn: int, width: int):
    """SlotVerify's tensors for a batch of `width`-token chunks after cached state: the
    DecodeKV copies of the first n_attn attention layers refilled to each sequence's cached
    tokens, and (positions, rows, lengths, conv slots, recurrent slots, keys, values)."""
    rope, rows, lengths, keys, values = _copies(batch, cache, range(n_attn), width)
    return rope, rows, lengths, cache.conv, cache.recurrent, keys, values


def _copies(batch: ForwardBatch, cache: HybridCache, layers: range, width: int):
    """(rotary positions, rows, lengths, keys, values) of the DecodeKV copies of `layers`,
    each refilled to hold its sequence's tokens before the chunk."""
    slots = batch.state_indices.tolist()
    starts = batch.positions[::width].tolist()
    keys, values = [], []
    for j in layers:
        d = cache.decode_kv[j]
        d.reserve(max(starts) + width)
        d.refill(slots, starts, batch.block_tables, cache.key[j], cache.value[j])
    rows, lengths, n = decode_rows(slots, starts)
    for j in layers:
        keys.append(cache.decode_kv[j].key[:rows, :, :n])
        values.append(cache.decode_kv[j].value[:rows, :, :n])
    rope = batch.positions if batch.rope_positions is None else batch.rope_positions
    return rope, batch.state_indices, lengths, keys, values


def store_slot_verify(batch: ForwardBatch, cache: HybridCache, outputs: tuple, kept: list[int]):
    """Write what a SlotVerify step returned, kept[b] tokens of sequence b standing (1 ..
    width): its slots get the GDN states after its last kept token; every position's K/V goes
    to the paged blocks (past the kept ones nothing reads it, and the next step writes over
    it), the kept positions' to DecodeKV."""
    conv, recurrent, k, v = outputs
    width = conv.shape[2]
    idx = batch.state_indices
    rows, last = torch.arange(len(kept)), torch.tensor(kept) - 1
    cache.conv[:, idx] = conv[:, rows, last]
    cache.recurrent[:, idx] = recurrent[:, rows, last]
    slots, starts = idx.tolist(), batch.positions[::width].tolist()
    for j in range(k.shape[0]):
        write_kv(k[j], v[j], cache.key[j], cache.value[j], batch.slot_mapping)
        cache.decode_kv[j].append_run(k[j], v[j], slots, starts, width, kept)


def verify_logits(model, width, input_ids, positions, rows, lengths, conv, recurrent, keys,
                  values):  # fmt: skip
    """What a compiled verify graph computes, and the eager step runs: the model's one forward
    path over a SlotVerify step, the logits [T, vocab] fp32 and final hidden states [T, H],
    then the step's outputs (SlotVerify.outputs)."""
    step = SlotVerify(width, positions, rows, lengths, conv, recurrent, keys, values)
    hidden = model.hidden_states(input_ids, step)
    return model.compute_logits(hidden), hidden, *step.outputs()


def slot_verifies(batch: ForwardBatch, cache: HybridCache) -> bool:
    """The verify rows run as a SlotVerify: a cache with DecodeKV copies (CPU, the torch
    kernels), no multimodal positions."""
    return bool(cache.decode_kv) and batch.mrope_positions is None


def mtp_logits(model, width, input_ids, hidden, positions, rows, lengths, keys, values):
    """The MTP head's step over `width` positions per sequence (a graph's body, and the eager
    step's): input_ids [T] the token after each position, hidden [T, H] the main model's (or
    the head's own) hidden states there. Returns the head's logits [T, vocab] fp32, its output
    hidden states [T, H] and its new K/V [n_mtp, T, Hkv, D] twice."""
    first = len(model.config.attention_layers)
    step = SlotVerify(width, positions, rows, lengths, None, None, keys, values, first)
    h = model.mtp(model.embed_tokens(input_ids), hidden, step)
    return model.compute_logits(h), h, torch.stack(step.new["k"]), torch.stack(step.new["v"])


def slot_mtp_inputs(batch: ForwardBatch, cache: HybridCache, first: int, width: int):
    """mtp_logits' tensors after its hidden states: (positions, rows, lengths, keys, values),
    the head's DecodeKV copies (cache layers `first` on) refilled to each sequence's start."""
    return _copies(batch, cache, range(first, len(cache.decode_kv)), width)


def store_slot_mtp(batch: ForwardBatch, cache: HybridCache, first: int, k, v, kept: list[int]):
    """The head's new K/V [n_mtp, T, Hkv, D]: every position's into the paged blocks, the
    first kept[b] of each sequence's into DecodeKV."""
    width = k.shape[1] // len(kept)
    slots, starts = batch.state_indices.tolist(), batch.positions[::width].tolist()
    for j in range(k.shape[0]):
        layer = first + j
        write_kv(k[j], v[j], cache.key[layer], cache.value[layer], batch.slot_mapping)
        cache.decode_kv[layer].append_run(k[j], v[j], slots, starts, width, kept)
