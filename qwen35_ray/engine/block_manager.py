"""Allocators of the hybrid cache, pure Python: KV blocks for the attention layers and fixed
state slots for the GDN layers. A running sequence holds one slot and ceil(tokens / P) blocks."""

from collections import deque


class Pool:
    """A free list of integer ids (blocks or slots)."""

    def __init__(self, size: int, what: str):
        self.size = size
        self.what = what
        self._free = deque(range(size))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} {self.what}, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def give(self, ids: list[int]) -> None:
        self._free.extend(ids)


class CacheManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int):
        self.block_size = block_size
        self.blocks = Pool(num_blocks, "KV blocks")
        self.slots = Pool(num_slots, "state slots")

    def blocks_needed(self, seq, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.blocks.num_free

    def grow(self, seq, num_tokens: int) -> None:
        """Make seq's block table hold num_tokens tokens (and give it a slot if it has none)."""
        if seq.slot is None:
            seq.slot = self.slots.take(1)[0]
        seq.block_table.extend(self.blocks.take(self.blocks_needed(seq, num_tokens)))

    def release(self, seq) -> None:
        self.blocks.give(seq.block_table)
        seq.block_table = []
        if seq.slot is not None:
            self.slots.give([seq.slot])
            seq.slot = None

    @property
    def is_empty(self) -> bool:
        """Nothing allocated: every block and slot is back in its pool."""
        return self.blocks.num_free == self.blocks.size and self.slots.num_free == self.slots.size
