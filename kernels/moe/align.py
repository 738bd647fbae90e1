"""Token copies sorted by expert, each expert's run padded to a multiple of the GEMM block.

The layout of vLLM's moe_align_block_size, built from a few device-side torch ops of static
sizes (no host sync, so a CUDA graph can capture it): the grouped GEMM gives every block of
`block_m` sorted entries to one expert, so a block never mixes experts and an expert without
tokens owns no block.
"""

import torch


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, k]
    block_m: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (sorted_ids [M] int32: flat (token, choice) index t * k + j of each entry,
    T * k for padding; expert_ids [M / block_m] int32, -1 for blocks past the end;
    num_padded [1] int32: entries in use). M bounds the padded total without reading it."""
    flat = topk_ids.reshape(-1).long()
    N = flat.numel()
    dev = flat.device
    # at most one partial block per expert, and never more blocks than copies
    M = min(N + num_experts * (block_m - 1), N * block_m)
    M = (M + block_m - 1) // block_m * block_m
    # not bincount: on CUDA it reads the largest id back to the host to size its output
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(N, device=dev) - (counts.cumsum(0) - counts)[expert]
    sorted_ids = torch.full((M,), N, dtype=torch.int32, device=dev)
    sorted_ids[(ends - padded)[expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, M, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(block_start < ends[-1], expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)
