"""DecodeKV: a contiguous copy of each running sequence's keys and values for CPU decode.

A decode step on CPU would otherwise gather every sequence's K/V out of its paged blocks, for
every attention layer and every step: megabytes copied to read each once. Here each GDN state
slot (one per running sequence) also keeps its sequence's K/V contiguous, [Hkv, cap, D], so a
step appends one token per sequence and attends straight from this copy.

The paged cache stays the truth (prefill, prefix caching, export and import read and write
it). A slot's copy is current when it holds exactly the tokens before the one being decoded;
anything else (a new sequence in the slot, a prefill chunk, an imported or restored state)
marks it stale, and its next decode refills it from the sequence's blocks.

Legend: S = state slots, Hkv = KV heads, D = head dim, cap = tokens held per slot.
"""

import torch

# the copy grows in steps of this many tokens
GROW = 256


class DecodeKV:
    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        shape = (num_slots, num_kv_heads, 0, head_dim)
        self.key = torch.zeros(shape, dtype=dtype)  # [S, Hkv, cap, D]
        self.value = torch.zeros(shape, dtype=dtype)
        # tokens of the slot's current sequence held here; -1: stale
        self.length = [-1] * num_slots

    def invalidate(self, slots: list[int]) -> None:
        for s in slots:
            self.length[s] = -1

    def refill(
        self,
        slots: list[int],  # [B] state slot of each sequence
        positions: list[int],  # [B] position of each sequence's new token
        block_tables: torch.Tensor,  # [B, M]
        key_cache: torch.Tensor,  # [N, P, Hkv, D] this layer's paged blocks
        value_cache: torch.Tensor,
    ) -> None:
        """Make each slot hold exactly its sequence's tokens before the new one, copying the
        stale ones from their blocks."""
        self.reserve(max(positions) + 1)
        P, Hkv, D = key_cache.shape[1:]
        for i, (s, p) in enumerate(zip(slots, positions)):
            if self.length[s] != p:
                pos = torch.arange(p)
                flat = block_tables[i, pos // P] * P + pos % P
                self.key[s, :, :p] = key_cache.view(-1, Hkv, D)[flat].transpose(0, 1)
                self.value[s, :, :p] = value_cache.view(-1, Hkv, D)[flat].transpose(0, 1)
                self.length[s] = p

    def decode(
        self,
        q: torch.Tensor,  # [B, Hq, D] one query per sequence
        k: torch.Tensor,  # [B, Hkv, D] its own key and value
        v: torch.Tensor,
        batch,  # the decodes' ForwardBatch
        key_cache: torch.Tensor,  # [N, P, Hkv, D] this layer's paged blocks
        value_cache: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention of a batch of decodes over this copy, [B, Hq, D]: nothing gathered from
        the blocks unless a slot is stale; the new k, v are appended after."""
        slots, positions = batch.state_indices.tolist(), batch.positions.tolist()
        self.refill(slots, positions, batch.block_tables, key_cache, value_cache)
        rows, lengths, n = decode_rows(slots, positions)
        K, V = self.key[:rows, :, :n], self.value[:rows, :, :n]
        o = decode_attention(q, k, v, K, V, batch.state_indices, lengths, scale)
        self.append(k, v, slots, positions)
        return o

    def append(
        self,
        k: torch.Tensor,  # [B, Hkv, D] the new token of each sequence
        v: torch.Tensor,
        slots: list[int],
        positions: list[int],
    ) -> None:
        """Add the new tokens after refill() and the step that attended to them."""
        rows, cols = torch.tensor(slots), torch.tensor(positions)
        self.key[rows, :, cols] = k.to(self.key.dtype)
        self.value[rows, :, cols] = v.to(self.value.dtype)
        for s, p in zip(slots, positions):
            self.length[s] = p + 1

    def append_run(
        self,
        k: torch.Tensor,  # [B * w, Hkv, D] w new tokens per sequence
        v: torch.Tensor,
        slots: list[int],
        starts: list[int],  # [B] position of each sequence's first new token
        width: int,
        kept: list[int],  # [B] of its w tokens, those that stand (the copy holds them)
    ) -> None:
        """Add a verify step's tokens after refill(): the copy then holds each sequence's
        tokens up to its last kept one."""
        self.reserve(max(starts) + width)
        ks, vs = k.unflatten(0, (-1, width)), v.unflatten(0, (-1, width))
        for b, (s, p) in enumerate(zip(slots, starts)):
            self.key[s, :, p : p + width] = ks[b].transpose(0, 1).to(self.key.dtype)
            self.value[s, :, p : p + width] = vs[b].transpose(0, 1).to(self.value.dtype)
            self.length[s] = p + kept[b]

    def reserve(self, n: int) -> None:
        """Room for n tokens per slot."""
        cap = self.key.shape[2]
        if n <= cap:
            return
        new_cap = -(-n // GROW) * GROW
        # made outside inference mode, or the engine's steps could write it but nothing else
        with torch.inference_mode(False):
            for name in ("key", "value"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                new[:, :, :cap] = old
                setattr(self, name, new)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D] one query per sequence
    k: torch.Tensor,  # [B, Hkv, D] its own key and value
    v: torch.Tensor,
    K: torch.Tensor,  # [R, Hkv, n, D] earlier keys, one row per state slot
    V: torch.Tensor,
    rows: torch.Tensor,  # [B] each sequence's row in K and V
    lengths: torch.Tensor,  # [R] earlier tokens of each row
    scale: float,
) -> torch.Tensor:
    """Attention of each new token over its sequence's earlier tokens and itself, [B, Hq, D]:
    one masked matmul for all rows and heads. Rows of slots outside the batch compute values
    nobody reads. Nothing is written, so a compiled decode step can use it."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    R, n = K.shape[0], K.shape[2]
    qs = q.new_zeros(R, Hkv, Hq // Hkv, D).index_copy(0, rows, q.view(B, Hkv, -1, D))
    kn = k.new_zeros(R, Hkv, 1, D).index_copy(0, rows, k[:, :, None])
    vn = v.new_zeros(R, Hkv, 1, D).index_copy(0, rows, v[:, :, None])
    past = torch.arange(n, device=q.device) < lengths[:, None, None, None]  # [R, 1, 1, n]
    old = (qs @ K.to(q.dtype).transpose(-1, -2)) * scale
    old = old.masked_fill(~past, float("-inf"))  # [R, Hkv, G, n]
    new = (qs @ kn.transpose(-1, -2)) * scale  # [R, Hkv, G, 1]
    p = torch.cat([old, new], dim=-1).float().softmax(-1).to(q.dtype)
    o = p[..., :n] @ V.to(q.dtype) + p[..., n:] * vn  # [R, Hkv, G, D]
    return o.index_select(0, rows).reshape(B, Hq, D)


def decode_rows(slots: list[int], positions: list[int]) -> tuple[int, torch.Tensor, int]:
    """For decode_attention over DecodeKV: the rows to read (up to the highest slot), the
    earlier tokens of each row (the slot's position; rows outside the batch see all n) and n,
    the longest (at least 1)."""
    rows, n = max(slots) + 1, max(max(positions), 1)
    lengths = torch.full((rows,), n)
    lengths[slots] = torch.tensor(positions)
    return rows, lengths, n
