"""How many KV blocks and GDN state slots a replica gets, from its byte budgets.

One request needs a whole GDN state slot however short it is (45 layers x 64 heads x 128 x 128
x 4 B = 189 MB at 397B) and KV in proportion to its length, so the two are budgeted apart.
"""

from dataclasses import dataclass

import torch

from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.config import ModelConfig


@dataclass(frozen=True)
class CacheSize:
    num_blocks: int
    num_slots: int  # for running sequences
    num_snapshots: int  # for prefix-cache GDN snapshots


def resolve_max_model_len(config: ModelConfig, ec: EngineConfig) -> int:
    """The engine's context: max_model_len, or the model's own (ModelConfig.context_len: YaRN's
    factor x original_max_position_embeddings, else max_position_embeddings). Longer than the
    model's is an error, not a silent cap."""
    if ec.max_model_len is None:
        return config.context_len
    if ec.max_model_len > config.context_len:
        raise ValueError(
            f"max_model_len={ec.max_model_len} exceeds the model's {config.context_len}-token "
            f"context ({config.describe_context()}); lower max_model_len"
        )
    return ec.max_model_len


def size_cache(
    config: ModelConfig, ec: EngineConfig, dtype: torch.dtype, max_model_len: int
) -> CacheSize:
    # with speculative decoding the MTP layer keeps K/V in the same blocks, and a sequence
    # reserves blocks for the positions its step may write past its length
    spec = ec.speculative
    per_block = HybridCache.bytes_per_block(config, ec.block_size, dtype, mtp=spec is not None)
    num_blocks = ec.num_kv_blocks or ec.kv_cache_memory_bytes // per_block
    need = -(-(max_model_len + (spec.lookahead if spec else 0)) // ec.block_size)
    if num_blocks < need:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks of {ec.block_size} tokens, but one "
            f"request of max_model_len={max_model_len} needs {need}; raise "
            "kv_cache_memory_bytes (or num_kv_blocks) or lower max_model_len"
        )
    if ec.state_memory_bytes is None:
        slots = ec.max_num_seqs
        snapshots = 0
        if ec.enable_prefix_caching:
            snapshots = ec.num_snapshot_slots if ec.num_snapshot_slots is not None else slots
        return CacheSize(num_blocks, slots, snapshots)
    per_slot = HybridCache.bytes_per_slot(config, dtype)
    total = ec.state_memory_bytes // per_slot
    wanted = 2 if ec.enable_prefix_caching else 1
    if total < wanted:
        raise ValueError(
            f"state_memory_bytes={ec.state_memory_bytes} holds {total} GDN state slots of "
            f"{per_slot} bytes; one request needs {wanted}"
            f"{' (its own and a prefix-cache snapshot)' if wanted == 2 else ''}; raise "
            "state_memory_bytes" + (" or disable prefix caching" if wanted == 2 else "")
        )
    if not ec.enable_prefix_caching:
        return CacheSize(num_blocks, min(ec.max_num_seqs, total), 0)
    slots = min(ec.max_num_seqs, total // 2)
    snapshots = total - slots
    if ec.num_snapshot_slots is not None:
        snapshots = min(snapshots, ec.num_snapshot_slots)
    return CacheSize(num_blocks, slots, snapshots)
