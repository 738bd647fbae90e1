"""Helpers shared by the ops: device dispatch and the chunk layout of varlen batches."""

import torch


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors run the PyTorch paths."""
    return x.is_cuda


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[NT, 2] int32: (sequence, chunk within the sequence) of every chunk of the batch.

    Chunks never cross a sequence boundary, so a sequence of L tokens owns ceil(L / chunk_size)
    of them; one host sync reads the lengths, as flash-linear-attention does.
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    pairs = [(b, c) for b, n in enumerate(lens) for c in range((n + chunk_size - 1) // chunk_size)]
    out = torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2)
    return out.to(cu_seqlens.device)


def prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B+1] int32: index of each sequence's first chunk in the batch's chunk list."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    n = (lens + chunk_size - 1) // chunk_size
    return torch.cat([n.new_zeros(1), n.cumsum(0)]).to(torch.int32)
