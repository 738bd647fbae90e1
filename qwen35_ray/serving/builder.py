"""Serve YAML `args` -> an application.

- build_app: collocated (ingress + one pool of LLMServer replicas).
- build_pd_app: disaggregated (ingress + a PrefillServer pool + a DecodeServer pool).
"""

import logging

import pydantic
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.disagg import DecodeServer, PrefillServer
from qwen35_ray.serving.ingress import OpenAIIngress
from qwen35_ray.serving.llm_server import LLMServer
from qwen35_ray.serving.routing import FreeSlotsRouter, PrefixAffinityRouter

# how often replicas report slots, blocks and queues to the routers
ROUTING_STATS_PERIOD_S = 1.0

logger = logging.getLogger(__name__)


def parse_args(args: dict | None) -> AppConfig:
    try:
        return AppConfig.model_validate(args or {})
    except pydantic.ValidationError as e:
        lines = [
            f"  {'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors()
        ]
        raise ValueError("invalid qwen35-ray app args:\n" + "\n".join(lines)) from None


def warn_unplaceable(cfg: AppConfig, pools: tuple[str, ...]) -> list[str]:
    """A pool pinned to a resource no node of the cluster has yet waits for such a node (an
    autoscaling cluster may add one); say so at deploy time rather than leave a replica pending
    without a word. Returns the warnings."""
    if not ray.is_initialized():
        return []
    have = ray.cluster_resources()
    out = []
    for pool in pools:
        for name in getattr(cfg, pool).placement():
            if name in have:
                continue
            how = (
                "a node with that GPU type"
                if name.startswith("accelerator_type:")
                else f"a node advertising it (ray start --resources='{{\"{name}\": 100}}', or "
                "a KubeRay worker group's resources)"
            )
            out.append(
                f"{pool} asks for resource {name!r}, which no node of this cluster has: its "
                f"replicas stay pending until {how} joins"
            )
    for line in out:
        logger.warning(line)
    return out


def _without_key(cfg: AppConfig) -> dict:
    """The engine replicas' args: they check no key, and the dashboard shows init args. The
    ingress gets the key as a SecretStr (masked in reprs); api_key_env / api_key_file keep it
    out of the args altogether."""
    return cfg.model_dump(exclude={"api_key"})


def build_app(args: dict | None = None) -> serve.Application:
    cfg = parse_args(args)
    warn_unplaceable(cfg, ("ingress", "llm_server"))
    # each engine replica is told its pool, whose `engine` settings it runs (AppConfig.engine_for)
    llm = serve.deployment(LLMServer, name="LLMServer", **cfg.serve_options("llm_server")).bind(
        _without_key(cfg), "llm_server"
    )
    return serve.deployment(
        OpenAIIngress, name="OpenAIIngress", **cfg.serve_options("ingress")
    ).bind(llm, cfg.model_dump())


def build_pd_app(args: dict | None = None) -> serve.Application:
    cfg = parse_args(args)
    warn_unplaceable(cfg, ("ingress", "prefill_server", "decode_server"))
    raw = _without_key(cfg)
    prefill_router = RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={
            "block_size": cfg.engine_for("prefill_server").block_size,
            "max_imbalance": cfg.disaggregation.prefix_affinity_max_imbalance,
        },
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
    )
    decode_router = RequestRouterConfig(
        request_router_class=FreeSlotsRouter,
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
    )
    prefill = serve.deployment(
        PrefillServer,
        name="PrefillServer",
        request_router_config=prefill_router,
        **cfg.serve_options("prefill_server"),
    ).bind(raw, "prefill_server")
    decode = serve.deployment(
        DecodeServer,
        name="DecodeServer",
        request_router_config=decode_router,
        **cfg.serve_options("decode_server"),
    ).bind(raw, "decode_server")
    return serve.deployment(
        OpenAIIngress, name="OpenAIIngress", **cfg.serve_options("ingress")
    ).bind(decode, cfg.model_dump(), prefill)
