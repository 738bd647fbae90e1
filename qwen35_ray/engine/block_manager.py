"""Allocators of the hybrid cache, pure Python.

- KV blocks of the full-attention layers, reference counted. With prefix caching a full block
  of prompt tokens is registered under the hash of its tokens chained to its predecessors';
  when its last user leaves it stays cached (evictable, least recently freed first).
- State slots of the GDN layers: one per running sequence.
- Snapshot slots: copies of a sequence's GDN state taken at a block boundary of its prompt.
  A later prompt with the same blocks up to that boundary starts from the snapshot and the
  cached blocks, and computes only the rest. GDN state cannot be rebuilt from KV blocks, so a
  prefix is reusable only up to a boundary that has a snapshot.

Snapshots are taken at two boundaries of a prompt: its last full block (the next turn of a
conversation extends it), and the last block it shares with the cache when that lies beyond
its snapshot hit (where two prompts part: a shared system prompt is reused from the third
request on). Snapshotting every block would cost one full GDN state per block.
"""

import hashlib
import heapq
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass


class Pool:
    """Free integer ids (slots), lowest first: the slots in use stay packed at the low end,
    so a CPU decode step, which reads DecodeKV rows up to the highest slot in its batch, reads
    no rows of idle slots (16 requests in 32 slots use slots 0-15, not all 32 in turn)."""

    def __init__(self, ids: range, what: str):
        self.size = len(ids)
        self.what = what
        self._free = list(ids)  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} {self.what}, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def give(self, ids: list[int]) -> None:
        for i in ids:
            heapq.heappush(self._free, i)


class BlockPool:
    def __init__(self, num_blocks: int):
        self.size = num_blocks
        self.ref = [0] * num_blocks
        self._free = deque(range(num_blocks))
        self._evictable: OrderedDict[int, bytes] = OrderedDict()  # block -> hash, ref 0
        self.by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def take(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, h = self._evictable.popitem(last=False)
                del self.by_hash[h], self._hash_of[b]
            self.ref[b] = 1
            out.append(b)
        return out

    def share(self, b: int) -> None:
        if self.ref[b] == 0:
            del self._evictable[b]
        self.ref[b] += 1

    def give(self, ids: list[int]) -> None:
        for b in ids:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = self._hash_of[b]
                else:
                    self._free.append(b)

    def register(self, b: int, h: bytes) -> None:
        if h not in self.by_hash and b not in self._hash_of:
            self.by_hash[h], self._hash_of[b] = b, h


@dataclass(frozen=True)
class PrefixHit:
    num_tokens: int  # tokens covered: a multiple of the block size
    blocks: list[int]
    snapshot: int  # snapshot slot holding the GDN state at that boundary


def block_hashes(
    tokens: list[int], block_size: int, num_blocks: int, extra: list[bytes] | None = None
) -> list[bytes]:
    """SHA-256 of each full block's tokens (and its `extra` bytes: the digests of the images
    whose tokens it holds) chained to its predecessors'. A key collision would hand one user's
    cached K/V and GDN state to another's prompt, so the key is a cryptographic hash, never
    Python's hash() (vLLM moved to SHA-256 for CVE-2025-25183)."""
    hashes, h = [], b""
    for i in range(num_blocks):
        block = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        h = hashlib.sha256(h + block + (extra[i] if extra else b"")).digest()
        hashes.append(h)
    return hashes


class CacheManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int, num_snapshots: int = 0):
        self.block_size = block_size
        self.blocks = BlockPool(num_blocks)
        self.slots = Pool(range(num_slots), "state slots")
        self.snapshot_slots = Pool(range(num_slots, num_slots + num_snapshots), "snapshots")
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()  # boundary hash -> slot
        self.prefix_caching = num_snapshots > 0

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

    def snapshot_boundary(self, seq) -> int:
        """The last block boundary of the prompt that leaves at least one token to compute."""
        if not self.prefix_caching:
            return 0
        return (len(seq.prompt_token_ids) - 1) // self.block_size * self.block_size

    def match(self, seq) -> PrefixHit | None:
        """The longest cached prefix of seq's prompt that ends at a snapshot. Also sets
        seq.snapshot_points: the boundaries where this prompt will leave snapshots."""
        last = self.snapshot_boundary(seq)
        hashes = self._hashes(seq, last // self.block_size)
        shared = best = 0
        for i, h in enumerate(hashes):
            if h not in self.blocks.by_hash:
                break
            shared = i + 1
            if h in self.snapshots:
                best = i + 1
        parting = shared * self.block_size
        seq.snapshot_points = sorted({last} | ({parting} if best < shared else set()))
        if best == 0:
            return None
        self.snapshots.move_to_end(hashes[best - 1])
        blocks = [self.blocks.by_hash[h] for h in hashes[:best]]
        return PrefixHit(best * self.block_size, blocks, self.snapshots[hashes[best - 1]])

    def adopt(self, seq, hit: PrefixHit) -> None:
        for b in hit.blocks:
            self.blocks.share(b)
        seq.block_table = list(hit.blocks)
        seq.num_computed = seq.num_cached_tokens = hit.num_tokens

    def _hashes(self, seq, n: int) -> list[bytes]:
        """The hashes of seq's first n prompt blocks; a block holding image tokens folds in
        the images' digests, so the same pad tokens of different pixels never match."""
        images = getattr(seq, "images", None)
        extra = None if images is None else images.block_keys(self.block_size, n)
        return block_hashes(seq.prompt_token_ids, self.block_size, n, extra)

    def remember(self, seq, boundary: int) -> int | None:
        """seq has just computed its prompt up to a snapshot boundary: register those blocks
        and return the snapshot slot to copy its GDN state into (None if already cached)."""
        n = boundary // self.block_size
        hashes = self._hashes(seq, n)
        for b, h in zip(seq.block_table, hashes):
            self.blocks.register(b, h)
        if hashes[-1] in self.snapshots or self.blocks.by_hash.get(hashes[-1]) is None:
            return None
        if self.snapshot_slots.num_free == 0:
            _, old = self.snapshots.popitem(last=False)
            self.snapshot_slots.give([old])
        slot = self.snapshot_slots.take(1)[0]
        self.snapshots[hashes[-1]] = slot
        return slot

    @property
    def is_empty(self) -> bool:
        """No sequence holds anything: every slot free, every block free or merely cached."""
        return self.blocks.num_free == self.blocks.size and self.slots.num_free == self.slots.size
