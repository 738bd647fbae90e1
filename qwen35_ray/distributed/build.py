"""build_engine: the engine a configuration asks for. expert_parallel_size 1 is today's
single-process LLMEngine (no Ray); N > 1 is a DPEngine over N rank actors, on the running Ray
cluster or on a local one started here."""

import logging
import math
import os

import transformers

from qwen35_ray.distributed.config import EPConfig, check_speculative
from qwen35_ray.engine.cache_sizing import resolve_max_model_len, size_cache
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import model_fingerprint
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.kernel_backend import kernel_backend
from qwen35_ray.model.loader import resolve_dtype
from qwen35_ray.model.source import resolve_model
from qwen35_ray.model.weights import weights_fingerprint

log = logging.getLogger(__name__)


def build_engine(
    model: str,
    dtype: str = "auto",
    device: str = "cpu",
    ep: EPConfig | None = None,
    placement_group=None,
    **engine_kwargs,
):
    """-> LLMEngine (ep.size == 1) or DPEngine. placement_group: the one the ranks' bundles
    are in (a Serve replica's own: ray.util.get_current_placement_group(), replica in bundle
    0, ranks in the last ep.size bundles); None: one is created, and removed by shutdown()."""
    ep = ep or EPConfig()
    # before the checkpoint is resolved and any rank starts
    check_speculative(ep.size, engine_kwargs.get("speculative"))
    if ep.size == 1:
        return LLMEngine.from_pretrained(model, dtype=dtype, device=device, **engine_kwargs)
    return start_dp_engine(
        resolve_model(model), dtype, device, ep, placement_group, EngineConfig(**engine_kwargs)
    )


def ensure_ray(ep: EPConfig) -> None:
    """Join the cluster RAY_ADDRESS names, or start a local one. Never another process's
    local cluster found by probing (address="auto" would). A local one gets at least the
    logical CPUs the ranks reserve: on a small machine the ranks share its cores (each runs
    int(rank_num_cpus) torch threads) rather than wait for CPUs that never come."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": "warning", "log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return
    cpus = max(os.cpu_count() or 1, math.ceil(ep.size * ep.num_cpus))
    log.info("starting a local Ray cluster with %d logical CPUs", cpus)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)


def startup_summary(infos: list[dict]) -> str:
    nodes = {i.get("node_id") for i in infos}
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    lines = [
        f"rank {i['rank']} on {i.get('node_ip')}: experts [{i['experts'][0]}, "
        f"{i['experts'][1]}), {mib(i.get('expert_bytes', 0))} of "
        f"{mib(i.get('expert_bytes_total', 0))} of expert weights"
        for i in infos
    ]
    return f"expert-parallel group of {len(infos)} ranks on {len(nodes)} node(s): " + "; ".join(
        lines
    )


def start_dp_engine(path, dtype, device, ep, placement_group, engine_config):
    """Start the rank group for the checkpoint at path and the per-rank engines over it."""
    # imported here: they import ray, which an EP=1 engine never loads
    from qwen35_ray.distributed.dp_engine import DPEngine
    from qwen35_ray.distributed.executor import RankExecutor
    from qwen35_ray.distributed.group import load_shards, start_group

    config = ModelConfig.from_hf(path)
    ep.check(device, config.num_experts)
    ec = engine_config
    if ec.compile_decode:
        raise ValueError(
            f"compile_decode is for a single-process engine; with expert_parallel_size="
            f"{ep.size} set compile_decode=False"
        )
    # an unusable backend fails here, before any rank starts
    kernel_backend(ec.kernels, device)
    torch_dtype = resolve_dtype(dtype, config)
    max_model_len = resolve_max_model_len(config, ec)
    # each rank's cache is an EP=1 engine's: its own slots and blocks for its own sequences
    size = size_cache(config, ec, torch_dtype, max_model_len)
    ensure_ray(ep)
    group = start_group(ep, device, placement_group)
    infos = load_shards(group, str(path), torch_dtype, device, size, ec)
    log.info(startup_summary(infos))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    fingerprint = model_fingerprint(config, torch_dtype, weights_fingerprint(path))
    engines = [
        LLMEngine(
            None,
            config,
            tokenizer,
            ec,
            path,
            device,
            executor=RankExecutor(actor, rank),
            dtype=torch_dtype,
            fingerprint=fingerprint,
        )
        for rank, actor in enumerate(group.actors)
    ]
    return DPEngine(engines, group)
