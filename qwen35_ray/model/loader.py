"""load_model: a checkpoint source -> a ready Qwen35ForCausalLM."""

import logging
from pathlib import Path

import torch

from qwen35_ray.model.attention import GatedAttention, rope_frequencies
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.expert_parallel import ExpertShard
from qwen35_ray.model.kernel_backend import KernelBackend, kernel_backend
from qwen35_ray.model.linear import column_major
from qwen35_ray.model.qwen35 import Qwen35ForCausalLM
from qwen35_ray.model.source import resolve_model
from qwen35_ray.model.weights import load_weights, weights_fingerprint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # fp8 checkpoints are dequantised; they compute in bf16
        return DTYPES.get(config.dtype, torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    with_mtp: bool = False,
    progress: bool = True,
    expert_shard: ExpertShard | None = None,
    kernels: str | KernelBackend = "auto",
) -> tuple[Qwen35ForCausalLM, ModelConfig, Path]:
    """The model at `model` (a directory, hub id or embedded name), ready for inference; with
    `expert_shard`, one rank of an expert-parallel group that reads only its experts. kernels:
    auto, torch or triton (model/kernel_backend.py), resolved here for `device`."""
    backend = kernel_backend(kernels, device)
    path = resolve_model(str(model))
    config = ModelConfig.from_hf(path)
    torch_dtype = resolve_dtype(dtype, config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device("meta"):
            net = Qwen35ForCausalLM(
                config, with_mtp=with_mtp, expert_shard=expert_shard, kernels=backend
            )
    finally:
        torch.set_default_dtype(previous)
    net = net.to_empty(device=device)
    for m in net.modules():
        if isinstance(m, GatedAttention):
            m.inv_freq = rope_frequencies(config).to(device)
    if net.expert_load is not None:
        # to_empty left its counters uninitialised
        net.expert_load.reset()
    experts = None if expert_shard is None else range(expert_shard.start, expert_shard.stop)
    with torch.no_grad():
        load_weights(net, config, path, with_mtp=with_mtp, progress=progress, experts=experts)
        if torch.device(device).type == "cpu":
            # every matrix but the embedding, whose rows are looked up (model/linear.py); the
            # stacked routed experts stay as stored (kernels/moe/fused_moe.py)
            for p in net.parameters():
                if p.dim() == 2 and p is not net.embed_tokens.weight:
                    p.data = column_major(p.data)
        net.fuse_projections()
    # read by the engine for its RequestState fingerprint: decode must continue on these weights
    net.weights_fingerprint = weights_fingerprint(path)
    if expert_shard is not None:
        s = expert_shard
        log.info(
            "rank %d/%d holds experts [%d, %d) of %d: %.1f MiB of %.1f MiB expert weights",
            s.rank, s.size, s.start, s.stop, s.num_experts,
            net.resident_expert_bytes() / 2**20, net.total_expert_bytes() / 2**20,
        )  # fmt: skip
    return net.eval().requires_grad_(False), config, path
