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
