"""Drive our model directly for tests: one sequence per slot, blocks handed out in order."""

import torch

from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache

BLOCK = 16


class Driver:
    def __init__(self, model, config, num_slots=8, num_blocks=256, with_mtp=False):
        self.model = model
        self.cache = HybridCache.allocate(
            config,
            num_slots,
            num_blocks,
            BLOCK,
            next(model.parameters()).dtype,
            with_mtp=with_mtp,
        )
        self.computed = {}
        self.tables = {}
        self.next_block = 0

    def _table(self, seq: int, total: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * BLOCK < total:
            table.append(self.next_block)
            self.next_block += 1
        return table

    def batch(self, pieces: dict[int, list[int]]) -> ForwardBatch:
        chunks = []
        for seq, ids in pieces.items():
            done = self.computed.get(seq, 0)
            chunks.append(SeqChunk(done, len(ids), seq, self._table(seq, done + len(ids))))
        return ForwardBatch.build(chunks, BLOCK)

    @torch.no_grad()
    def step(self, pieces: dict[int, list[int]]):
        """Run new tokens of several sequences (slot = sequence id) in one flat batch.
        Returns ({seq: logits [len, V]}, hidden [T, H], batch)."""
        batch = self.batch(pieces)
        ids = torch.tensor([t for p in pieces.values() for t in p])
        hidden = self.model(ids, batch, self.cache)
        logits = self.model.compute_logits(hidden)
        out, start = {}, 0
        for seq, p in pieces.items():
            out[seq] = logits[start : start + len(p)]
            start += len(p)
            self.computed[seq] = self.computed.get(seq, 0) + len(p)
        return out, hidden, batch
