"""ForwardBatch: one step's flat batch of tokens and the cache handles of its sequences.

A token's index in its sequence (`positions`) places it in the cache; its rotary position may
differ: a sequence past its images continues at index + rope_delta on every axis, and a chunk
holding image tokens gives each token its multimodal (t, h, w) position (model/mrope.py).

Legend: T = tokens in the step, B = sequences, M = blocks per block table.
"""

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step: `num_new` tokens after `num_computed` cached ones."""

    num_computed: int
    num_new: int
    state_slot: int  # GDN state slot (conv + recurrent state)
    block_table: list[int]  # KV blocks of the full-attention layers, in position order
    # the rotary position of a token past the prompt's images is its index + rope_delta
    rope_delta: int = 0
    # [3, num_new] the (t, h, w) positions of a chunk holding image tokens; None: index + delta
    mrope: torch.Tensor | None = None


@dataclass(frozen=True)
class ForwardBatch:
    positions: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32, new tokens per sequence
    seq_lens: torch.Tensor  # [B] int32, cached + new tokens
    state_indices: torch.Tensor  # [B] int64
    has_initial_state: torch.Tensor  # [B] bool, False for a sequence's first chunk
    block_tables: torch.Tensor  # [B, M] int64, padded with block 0
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of each new token
    last_token_indices: torch.Tensor  # [B] int64, row of each sequence's last new token
    max_q_len: int
    # the first num_decodes sequences add one token each to existing state (decodes first)
    num_decodes: int = 0
    block_size: int = 16  # tokens per KV block, to find a position's slot from block_tables
    rope_positions: torch.Tensor | None = None  # [T] rotary position; None: equal to positions
    # [3, T] multimodal positions, only when a chunk of the step holds image tokens
    mrope_positions: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token to existing state: the single-step kernels apply.
        Decided on the host (num_decodes counts the chunks), never by reading a device
        tensor: a CUDA graph cannot capture a host sync."""
        return self.num_seqs > 0 and self.num_decodes == self.num_seqs

    @cached_property
    def parts(self) -> tuple["ForwardBatch | None", "ForwardBatch | None"]:
        """(decode part, prefill part): GDN and attention run each with its own kernels, so a
        prefill in the step does not send every decode through the chunked path."""
        D, B = self.num_decodes, self.num_seqs
        if D == B:
            return self, None
        if D == 0:
            return None, self
        T = self.positions.shape[0]
        return self._rows(0, D, 0, D, max_q_len=1), self._rows(D, B, D, T, max_q_len=self.max_q_len)

    def _rows(self, b0, b1, t0, t1, max_q_len):
        # the decodes lead the batch: rows from 0 are all decodes, rows from num_decodes none
        decode = b0 == 0 and b1 <= self.num_decodes
        return ForwardBatch(
            positions=self.positions[t0:t1],
            cu_seqlens=self.cu_seqlens[b0 : b1 + 1] - t0,
            seq_lens=self.seq_lens[b0:b1],
            state_indices=self.state_indices[b0:b1],
            has_initial_state=self.has_initial_state[b0:b1],
            block_tables=self.block_tables[b0:b1],
            slot_mapping=self.slot_mapping[t0:t1],
            last_token_indices=self.last_token_indices[b0:b1] - t0,
            max_q_len=max_q_len,
            num_decodes=b1 - b0 if decode else 0,
            block_size=self.block_size,
            rope_positions=None if self.rope_positions is None else self.rope_positions[t0:t1],
            mrope_positions=None
            if self.mrope_positions is None
            else self.mrope_positions[:, t0:t1],
        )

    @classmethod
    def build(cls, chunks: list[SeqChunk], block_size: int, device="cpu") -> "ForwardBatch":
        positions, slots, cu = [], [], [0]
        for c in chunks:
            pos = range(c.num_computed, c.num_computed + c.num_new)
            needed = (c.num_computed + c.num_new + block_size - 1) // block_size
            if len(c.block_table) < needed:
                raise ValueError(
                    f"block table of {len(c.block_table)} blocks cannot hold "
                    f"{c.num_computed + c.num_new} tokens at block_size={block_size}"
                )
            positions.extend(pos)
            slots.extend(c.block_table[p // block_size] * block_size + p % block_size for p in pos)
            cu.append(cu[-1] + c.num_new)
        width = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=device)

        # text only (no delta anywhere): the rotary positions are the token indices
        index = t(positions, torch.int64)
        rope, mrope = index, None
        if any(c.rope_delta for c in chunks):
            rope = index + t([c.rope_delta for c in chunks], torch.int64).repeat_interleave(
                t([c.num_new for c in chunks], torch.int64)
            )
        if any(c.mrope is not None for c in chunks):
            # chunks without images at their index + delta, equal on all three axes
            parts, start = [], 0
            for c in chunks:
                r = rope[start : start + c.num_new]
                parts.append(r.expand(3, -1) if c.mrope is None else c.mrope.to(rope))
                start += c.num_new
            mrope = torch.cat(parts, dim=1)

        return cls(
            positions=index,
            cu_seqlens=t(cu, torch.int32),
            seq_lens=t([c.num_computed + c.num_new for c in chunks], torch.int32),
            state_indices=t([c.state_slot for c in chunks], torch.int64),
            has_initial_state=t([c.num_computed > 0 for c in chunks], torch.bool),
            block_tables=t(tables, torch.int64),
            slot_mapping=t(slots, torch.int64),
            last_token_indices=t([x - 1 for x in cu[1:]], torch.int64),
            max_q_len=max(c.num_new for c in chunks),
            num_decodes=_leading_decodes(chunks),
            block_size=block_size,
            rope_positions=rope,
            mrope_positions=mrope,
        )


def _leading_decodes(chunks: list[SeqChunk]) -> int:
    n = 0
    for c in chunks:
        if c.num_new != 1 or c.num_computed == 0:
            break
        n += 1
    return n
