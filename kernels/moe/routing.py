"""Softmax top-k router: probabilities over all experts, the k largest kept and renormalised."""

import torch
from qwen35_kernels.utils import use_triton


def topk_softmax(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [T, k] in the logits' dtype, expert ids [T, k] int64)."""
    if use_triton(router_logits):
        from qwen35_kernels.moe.fused_moe_triton import topk_softmax_triton

        return topk_softmax_triton(router_logits, top_k, renormalize)
    return topk_softmax_torch(router_logits, top_k, renormalize)


def topk_softmax_torch(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids
