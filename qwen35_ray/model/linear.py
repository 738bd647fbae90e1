"""Projections of one input fused into one matmul.

A layer's bias-free projections of the same input (GDN's q/k/v, z, b, a; attention's q, k, v;
the MoE router, shared-expert gate and shared-expert gate/up) keep their own modules, which
the checkpoint loader fills. After loading, `fuse_rows` stacks their weights into one matrix
and makes each module's weight a view of its rows: one matmul instead of several, nothing
stored twice. Before that (a module built and filled by hand) `project` stacks them per call.

On CPU the loader stores matrix weights column-major (`column_major`): still [out, in], but
laid out as their transpose. A decode matmul of a few rows then reads the weight as one
contiguous [in, out] stream; with the weights out of cache that measured about twice as fast
(MKL, [2, 128] x 1 MiB: 68 against 140 us). The stacked routed experts are the exception:
their gathered products run faster row-major (kernels/moe/fused_moe.py).
"""

import torch
import torch.nn.functional as F
from torch import nn


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix stored as its transpose; for a stack of matrices ([E, out,
    in], the routed experts), each matrix so."""
    return weight.mT.contiguous().mT


def fuse_rows(modules: list[nn.Module]) -> torch.Tensor:
    """[sum of out, in]: the modules' weights ([out, in] each) stacked in order, in their
    layout (row- or column-major); each module's weight becomes a view of its rows."""
    fused = torch.cat([m.weight.detach() for m in modules])
    if modules[0].weight.stride(0) == 1:
        fused = column_major(fused)
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = fused[start : start + n]
        start += n
    return fused


def project(x: torch.Tensor, fused: torch.Tensor | None, modules: list[nn.Module]):
    """Each module's x @ weight.T, from one matmul over the fused weight (or, unfused, their
    weights stacked now)."""
    weight = fused if fused is not None else torch.cat([m.weight for m in modules])
    return F.linear(x, weight).split([m.weight.shape[0] for m in modules], dim=-1)
