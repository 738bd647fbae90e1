"""A greedy speculative step as one forward, on CPU (issue 22).

The general speculative step (engine/spec_step.py) runs the verify forward, then in Python the
acceptance, then the MTP head over each verify row's kept positions, then k - 1 more head steps
for the recursive drafts: k + 1 graph calls, each with its inputs made and its outputs stored.
For a greedy row every decision between them is an argmax, which the graph can take itself:
the row keeps its drafts while they equal the verify's argmaxes, the head reads those argmaxes
as its next tokens, and the drafts are the head's own argmaxes. So when every verify row of a
step is greedy (and no prompt chunk runs with them) `greedy_spec` does all of it in one forward
(compiled by engine/verify_graph.py; the eager step runs the same code), and returns only what
is stored: the GDN states after each row's last kept position (not every position's), the main
layers' and the head's new K/V, the emitted tokens and the next drafts.

The recursive draft steps (DraftStep) attend over the head's cached K/V, its K/V of the step's
kept positions (the pass's positions past them are masked out) and the earlier draft steps'
own. Their K/V is not stored: the next step's head pass starts at the first of those positions
and writes them again before anything reads them.

Legend: B = verify rows, w = k + 1 their width, T = B * w, n = cached tokens read.
"""

from dataclasses import dataclass, field

import torch
from qwen35_kernels.rope import apply_rope

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.slot_verify import SlotVerify, _copies


@dataclass
class DraftStep:
    """One position per row after its kept ones, for the head's recursive drafts."""

    positions: torch.Tensor  # [B] rotary position of the row's next draft step
    rows: torch.Tensor  # [B] each row's row in keys/values (its state slot)
    lengths: torch.Tensor  # [R] cached tokens of each row
    keys: list[torch.Tensor]  # per head layer [R, Hkv, n, D] (DecodeKV)
    values: list[torch.Tensor]
    pass_keys: torch.Tensor  # [n_mtp, T, Hkv, D] the head pass's K/V over the verify rows
    pass_values: torch.Tensor
    valid: torch.Tensor  # [B, w] the pass's kept positions
    layer0: int  # the cache index of keys[0]
    own: dict[int, list] = field(default_factory=dict)  # layer -> [(k, v)] of earlier steps

    def rope(self, x: torch.Tensor, inv_freq, scale: float, mrope_section) -> torch.Tensor:
        return apply_rope(x, self.positions, inv_freq, scale)

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [B, Hq, D] over the row's cached tokens, the pass's kept ones, the earlier draft
        steps' and its own k, v [B, Hkv, D]."""
        i = layer - self.layer0
        own = self.own.setdefault(layer, [])
        own.append((k, v))
        B, Hq, D = q.shape
        Hkv = k.shape[1]
        w = self.valid.shape[1]
        K, V = self.keys[i].index_select(0, self.rows), self.values[i].index_select(0, self.rows)
        n = K.shape[2]
        K = torch.cat([K.to(q.dtype), _rows(self.pass_keys[i], w), _stack(own, 0)], 2)
        V = torch.cat([V.to(q.dtype), _rows(self.pass_values[i], w), _stack(own, 1)], 2)
        cached = torch.arange(n, device=q.device) < self.lengths[self.rows][:, None]
        mine = torch.ones(B, len(own), dtype=torch.bool, device=q.device)
        seen = torch.cat([cached, self.valid, mine], 1)[:, None, None]  # [B, 1, 1, L]
        qs = q.view(B, Hkv, Hq // Hkv, D)
        s = ((qs @ K.transpose(-1, -2)) * scale).masked_fill(~seen, float("-inf"))
        return (s.float().softmax(-1).to(q.dtype) @ V).reshape(B, Hq, D)


def _rows(t: torch.Tensor, w: int) -> torch.Tensor:  # [T, Hkv, D] -> [B, Hkv, w, D]
    return t.unflatten(0, (-1, w)).transpose(1, 2)


def _stack(own: list, j: int) -> torch.Tensor:  # -> [B, Hkv, steps, D]
    return torch.stack([kv[j] for kv in own], 2)


def greedy_spec(model, width, input_ids, positions, rows, lengths, conv, recurrent, keys, values,
                head_keys, head_values):  # fmt: skip
    """Verify, accept, the head's pass and its k drafts for B greedy verify rows of `width`
    tokens (input_ids [T]: each row's last token then its drafts). Returns (target [B, w]
    the verify's argmaxes, of which each row emits the first `kept`; kept [B]; drafts [B, k];
    conv [n_gdn, B, C, W-1] and recurrent [n_gdn, B, HV, K, V] after each row's last kept
    position; the main layers' new K/V [n_attn, T, Hkv, D] twice; the head's [n_mtp, T, Hkv,
    D] twice)."""
    w, k = width, width - 1
    step = SlotVerify(w, positions, rows, lengths, conv, recurrent, keys, values)
    hidden = model.hidden_states(input_ids, step)
    target = model.compute_logits(hidden).argmax(-1).view(-1, w)
    drafts = input_ids.view(-1, w)[:, 1:]
    kept = torch.cumprod((drafts == target[:, :k]).long(), 1).sum(1) + 1
    last = kept - 1
    B = target.shape[0]
    b = torch.arange(B, device=target.device)
    conv_last, recurrent_last = step.states_at(last)
    main_k, main_v = torch.stack(step.new["k"]), torch.stack(step.new["v"])
    # the head over every position of the row: the emitted tokens after them, the last
    # repeated past them (those positions' outputs and K/V are never read)
    upto = torch.minimum(torch.arange(w, device=target.device)[None], last[:, None])  # [B, w]
    first = len(model.config.attention_layers)
    head = SlotVerify(w, positions, rows, lengths, None, None, head_keys, head_values, first)
    # its K/V at every position, its output (the MoE's part) at the last kept one alone
    h = model.mtp(model.embed_tokens(target.gather(1, upto).flatten()), hidden, head, b * w + last)
    head_k, head_v = torch.stack(head.new["k"]), torch.stack(head.new["v"])
    out = [model.compute_logits(h).argmax(-1)]
    start = positions.view(-1, w)[:, 0] + last
    valid = torch.arange(w, device=target.device)[None] <= last[:, None]
    ds = DraftStep(start, rows, lengths, head_keys, head_values, head_k, head_v, valid, first)
    for j in range(1, k):
        ds.positions = start + j
        h = model.mtp(model.embed_tokens(out[-1]), h, ds)
        out.append(model.compute_logits(h).argmax(-1))
    return (target, kept, torch.stack(out, 1), conv_last, recurrent_last, main_k, main_v, head_k,
            head_v)  # fmt: skip


def greedy_spec_inputs(batch: ForwardBatch, cache: HybridCache, n_attn: int, width: int):
    """greedy_spec's tensors after input_ids: the DecodeKV copies of every attention layer, the
    head's included, refilled to each row's cached tokens."""
    rope, rows, lengths, keys, values = _copies(batch, cache, range(len(cache.decode_kv)), width)
    return (rope, rows, lengths, cache.conv, cache.recurrent, keys[:n_attn], values[:n_attn],
            keys[n_attn:], values[n_attn:])  # fmt: skip


def store_greedy_spec(batch: ForwardBatch, cache: HybridCache, outputs, kept: list[int]):
    """Write greedy_spec's states and K/V (its outputs from conv on): each row's slots get the
    states after its last kept token, every position's K/V goes to the paged blocks and the
    kept positions' to DecodeKV, the main layers' and the head's alike."""
    conv, recurrent, main_k, main_v, head_k, head_v = outputs
    idx = batch.state_indices
    # one copy per tensor for every layer at once (as HybridCache.write): at one sequence a
    # step is small enough that each eager op's own cost counts
    cache.conv.index_copy_(1, idx, conv)
    cache.recurrent.index_copy_(1, idx, recurrent)
    width = main_k.shape[1] // len(kept)
    slots, starts = idx.tolist(), batch.positions[::width].tolist()
    k, v = torch.cat([main_k, head_k]), torch.cat([main_v, head_v])
    for new, paged in ((k, cache.key), (v, cache.value)):
        # [layers, N * P, Hkv, D]: view() raises where flatten() would copy and write nowhere;
        # the slots of a step's tokens are distinct
        flat = paged[: len(new)].view(len(new), -1, *paged.shape[3:])
        flat.index_copy_(1, batch.slot_mapping, new.to(paged.dtype))
    for j in range(k.shape[0]):
        cache.decode_kv[j].append_run(k[j], v[j], slots, starts, width, kept)
