"""The settings of one Serve deployment of the app (resources, replicas, queues) and of an
engine pool's engine: the parts of AppConfig (config.py) that each pool repeats."""

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from qwen35_ray.distributed.config import check_speculative
from qwen35_ray.engine.speculative import SpeculativeConfig

# Ray refuses an empty placement-group bundle; a replica or rank asking for no resources
# gets this much CPU instead (Ray counts resources in units of 1e-4)
MIN_BUNDLE_CPU = 0.01


# resources a pool names with its own keys (num_cpus, num_gpus, accelerator_type), or Ray's own
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
RESERVED_PREFIXES = ("accelerator_type:",)
# what a replica asks of its accelerator-type resource (Ray's own figure for accelerator_type)
ACCELERATOR_TYPE_AMOUNT = 0.001


def placement_bundle(
    cpus: float, gpus: float, extra: dict[str, float] | None = None
) -> dict[str, float]:
    """A placement-group bundle of these resources (MIN_BUNDLE_CPU where none is asked)."""
    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    return {**(bundle or {"CPU": MIN_BUNDLE_CPU}), **(extra or {})}


class DeploymentConfig(BaseModel):
    """Replicas and resources of one deployment (the ingress, or an engine pool)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(1, ge=1)
    autoscaling_config: dict | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # None: derived from the engine's limits (see AppConfig.serve_options), so that the
    # replica's own bounded queue, not Serve's, decides when to answer 503
    max_ongoing_requests: int | None = Field(None, ge=1)
    # requests a caller (proxy, ingress) holds while every replica is at max_ongoing_requests;
    # beyond it Serve refuses them and the client gets a 503 (-1: unbounded, Serve's default)
    max_queued_requests: int | None = Field(None, ge=-1)
    # a replica Serve stops (scale-down, redeploy) takes no new requests and waits this long
    # for the ones it holds; streams still running then are cut off, and the ingress migrates
    # them (AppConfig.migration_limit)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    # how often a stopping replica checks whether its requests are done (Serve's default: 2 s)
    graceful_shutdown_wait_loop_s: float = Field(2.0, gt=0)
    # pins the pool to nodes: Ray custom resources each replica asks for, e.g.
    # {prefill_node: 0.01} on nodes started with --resources='{"prefill_node": 100}'
    resources: dict[str, float] = Field(default_factory=dict)
    # pins the pool to a GPU type, as Ray names it (H100, A100, L4, ...; a node reports its own
    # as the resource accelerator_type:<type>)
    accelerator_type: str | None = Field(None, min_length=1)

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]):
        for name, amount in v.items():
            if not name.strip() or name != name.strip():
                raise ValueError(f"resource name {name!r} is empty or has surrounding spaces")
            if name in RESERVED_RESOURCES or name.startswith(RESERVED_PREFIXES):
                raise ValueError(
                    f"resources: {name!r} is not a custom resource; use num_cpus, num_gpus or "
                    "accelerator_type for CPUs, GPUs and GPU types"
                )
            if "bundle" in name:
                raise ValueError(f"resources: {name!r}: Ray reserves names containing 'bundle'")
            if not amount > 0:
                raise ValueError(
                    f"resources.{name}={amount:g} must be > 0 (a node pin asks for a small "
                    "amount such as 0.01 of what the node advertises)"
                )
            if amount != round(amount, 4):
                raise ValueError(f"resources.{name}={amount!r}: Ray counts in steps of 0.0001")
        return v

    def placement(self) -> dict[str, float]:
        """The resources besides CPUs and GPUs that each replica (and, for an expert-parallel
        pool, each of its ranks) reserves."""
        out = dict(self.resources)
        if self.accelerator_type is not None:
            out[f"accelerator_type:{self.accelerator_type}"] = ACCELERATOR_TYPE_AMOUNT
        return out

    @field_validator("max_queued_requests")
    @classmethod
    def _queued(cls, v):
        if v is not None and v < 1 and v != -1:
            raise ValueError("max_queued_requests must be -1 (unbounded) or at least 1")
        return v

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, v):
        if v is not None:
            # Serve drops unknown keys silently and a bad policy_kwarg only shows at the first
            # policy tick; checked here, the deploy fails naming the key
            from qwen35_ray.serving.autoscaling import check_autoscaling_config

            check_autoscaling_config(v)
        return v

    @model_validator(mode="after")
    def _one_of_replicas_or_autoscaling(self):
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self

    def options(self, max_ongoing: int, max_queued: int) -> dict:
        """Serve deployment options; max_ongoing / max_queued: the defaults of this pool."""
        actor = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        if self.accelerator_type is not None:
            actor["accelerator_type"] = self.accelerator_type
        out = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests or max_ongoing,
            "max_queued_requests": (
                max_queued if self.max_queued_requests is None else self.max_queued_requests
            ),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
        }
        if self.autoscaling_config is not None:
            out["autoscaling_config"] = self.autoscaling_config
        else:
            out["num_replicas"] = self.num_replicas
        return out


# EngineArgs keys that say how a replica is laid out over rank actors, not how an engine runs
EP_FIELDS = ("expert_parallel_size", "rank_num_cpus", "rank_num_gpus", "placement_strategy")


class EngineArgs(BaseModel):
    """One replica's engine; with expert_parallel_size N > 1 the sizes below are per rank (each
    of the N ranks has max_num_seqs state slots and its own KV cache)."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    block_size: int = Field(16, ge=1)
    kv_cache_memory_bytes: int = Field(256 * 2**20, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    enable_prefix_caching: bool = True
    state_memory_bytes: int | None = Field(None, ge=1)
    compile_decode: bool | None = Field(
        None,
        description="CPU: decode steps as one torch.compile graph. None (auto): compiled in the "
        "background on a CPU engine of one process while the first steps run eagerly; True: "
        "compiled at start-up; False: never",
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="the model's ops: auto (Triton kernels on CUDA, PyTorch paths on CPU), "
        "torch (the PyTorch paths on any device, a reference on GPU), triton (the Triton "
        "kernels; on CPU only under TRITON_INTERPRET=1, slow, for tests). compile_decode stays "
        "off with triton",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="GPU: decode steps replayed from CUDA graphs captured per batch size at "
        "start-up. None (auto): on for a CUDA engine on the Triton kernels in one process; "
        "False: off",
    )
    long_prefill_token_threshold: int | None = Field(
        None,
        ge=0,
        description="tokens one prefill chunk may take of a step while other prompts wait; "
        "None: max(block_size, max_num_batched_tokens // 8), 0: no limit",
    )
    encoder_cache_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="vision tower outputs kept per image (by its pixels' hash), so a "
        "conversation that resends its images does not encode them again; 0: keep none",
    )
    speculative: dict | None = Field(
        None,
        description="speculative decoding with the checkpoint's MTP head (docs/mtp.md): "
        "{method: mtp, num_speculative_tokens: k}, k from 1 to 4 drafts verified per step; "
        "vLLM's qwen3_next_mtp / qwen3_5_mtp and SGLang's nextn name the same method. None: "
        "off. Needs expert_parallel_size 1",
    )
    expert_parallel_size: int = Field(
        1,
        ge=1,
        description="rank actors of one replica: routed experts split over them, attention "
        "and GDN data-parallel (each rank runs its own sequences)",
    )
    rank_num_cpus: float = Field(
        1.0, gt=0, description="CPUs of each rank actor (EP > 1); it runs that many torch threads"
    )
    rank_num_gpus: float = Field(0.0, ge=0, description="GPUs of each rank actor (EP > 1)")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK",
        description="how the replica and its ranks are placed (Ray placement-group strategy): "
        "PACK or SPREAD lets a group span nodes; STRICT_SPREAD puts each rank and the replica "
        "on a node of its own",
    )

    @field_validator("speculative")
    @classmethod
    def _speculative(cls, v: dict | None):
        spec = SpeculativeConfig.parse(v)
        return None if spec is None else {"method": spec.method, "num_speculative_tokens": spec.k}

    @model_validator(mode="after")
    def _speculative_needs_one_rank(self):
        check_speculative(self.expert_parallel_size, self.speculative)
        return self

    @property
    def engine_kwargs(self) -> dict:
        """What LLMEngine/EngineConfig takes: everything but the parallel layout."""
        return self.model_dump(exclude=set(EP_FIELDS))


class EnginePoolConfig(DeploymentConfig):
    """An engine pool: replicas, resources, and engine settings of its own."""

    # a partial `engine` merged over the top-level one (AppConfig.engine_for), e.g.
    # decode_server: {engine: {expert_parallel_size: 2}}; only the keys given count
    engine: EngineArgs | None = None
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of each replica's engine (set in its constructor); None: "
        "what Ray gives an actor, its num_cpus rounded down, at least 1",
    )

    @property
    def threads(self) -> int:
        """The torch threads a replica of this pool runs."""
        return self.torch_threads or max(1, int(self.num_cpus))

    @field_serializer("engine")
    def _given_only(self, engine: EngineArgs | None):
        # a replica re-validates the dumped config: defaults dumped here would override the
        # top-level engine there
        return None if engine is None else engine.model_dump(exclude_unset=True)
