"""AppConfig: the `args` of a Serve YAML, validated with readable errors."""

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from qwen35_ray.serving.media import MediaLimits
from qwen35_ray.serving.pool_config import (
    DeploymentConfig,
    EngineArgs,
    EnginePoolConfig,
    placement_bundle,
)

ENGINE_POOLS = ("llm_server", "prefill_server", "decode_server")

# A pool whose replicas are EP groups checks its ranks every EP_HEALTH_CHECK_PERIOD_S (Serve's
# default is 10 s). A dead or hung rank fails the first check after it dies (<= 2.2 s: Serve
# jitters the period by 10%, and a rank gets llm_server.RANK_CHECK_TIMEOUT_S to answer); the
# replica then exits (llm_server.DEAD_REPLICA_EXIT_S = 1 s), and Serve, seeing the actor gone,
# replaces the group at once: about 5 s at worst (tests/serving/test_ep_rank_death.py bounds it).
# A replica process that hangs fails on EP_HEALTH_CHECK_TIMEOUT_S three times in a row (~20 s).
EP_HEALTH_CHECK_PERIOD_S = 2.0
EP_HEALTH_CHECK_TIMEOUT_S = 5.0


class DisaggregationConfig(BaseModel):
    """How the disaggregated app (build_pd_app) splits work between its pools."""

    model_config = ConfigDict(extra="forbid")

    min_prefill_tokens: int = Field(
        32, ge=0, description="shorter prompts are prefilled on the decode replica"
    )
    max_prefill_queue: int = Field(
        64, ge=0, description="prefills in flight from one ingress beyond which prompts stay local"
    )
    transfer: Literal["object_store", "nixl"] = Field(
        "object_store", description="nixl: Ray Direct Transport, needs the nixl package"
    )
    retries: int = Field(
        1, ge=0, description="re-runs on another replica when one dies before any output"
    )
    prefix_affinity_max_imbalance: int = Field(
        4, ge=0, description="ongoing requests a prefix's replica may exceed the least loaded by"
    )


# the defaults, and why each: MediaLimits' docstring
_MEDIA = MediaLimits()


class MediaConfig(BaseModel):
    """What the ingress accepts of a request's images (serving/media.py's MediaLimits: each
    default and why; docs/security.md)."""

    model_config = ConfigDict(extra="forbid")

    limit_mm_per_prompt: int = Field(
        _MEDIA.limit_mm_per_prompt, ge=0, description="images per request (0: none)"
    )
    max_pixels: int = Field(
        _MEDIA.max_pixels, ge=1, description="pixels of one image, read from its header first"
    )
    max_image_bytes: int = Field(
        _MEDIA.max_image_bytes, ge=1, description="encoded bytes of one image"
    )
    allowed_media_domains: list[str] = Field(
        [],
        description="hosts whose http(s) image URLs the ingress fetches (exact match); empty: "
        "data: URIs only",
    )
    fetch_timeout_s: float = Field(
        _MEDIA.fetch_timeout_s, gt=0, description="one image URL's whole fetch"
    )
    max_redirects: int = Field(
        _MEDIA.max_redirects, ge=0, description="redirects one image fetch follows"
    )

    def limits(self) -> MediaLimits:
        return MediaLimits(
            limit_mm_per_prompt=self.limit_mm_per_prompt,
            max_pixels=self.max_pixels,
            max_image_bytes=self.max_image_bytes,
            allowed_media_domains=tuple(d.lower() for d in self.allowed_media_domains),
            fetch_timeout_s=self.fetch_timeout_s,
            max_redirects=self.max_redirects,
        )


class AppConfig(BaseModel):
    """Everything `deployments/qwen35.yaml` may say under `args`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("qwen35-tiny", description="embedded name, directory or hub id")
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    engine: EngineArgs = EngineArgs()
    llm_server: EnginePoolConfig = EnginePoolConfig()  # collocated app (build_app)
    prefill_server: EnginePoolConfig = EnginePoolConfig()  # disaggregated app (build_pd_app)
    decode_server: EnginePoolConfig = EnginePoolConfig()
    disaggregation: DisaggregationConfig = DisaggregationConfig()
    ingress: DeploymentConfig = DeploymentConfig(num_cpus=0.5)
    media: MediaConfig = MediaConfig()
    api_key: SecretStr | None = Field(
        None,
        description="if set, Bearer token required on /v1 routes; local use only: Ray's "
        "dashboard shows the app's args, prefer api_key_env or api_key_file",
    )
    api_key_env: str | None = Field(
        None, description="name of an environment variable holding the API key"
    )
    api_key_file: str | None = Field(
        None, description="path of a file holding the API key (a mounted Kubernetes Secret)"
    )
    trust_request_chat_template: bool = Field(
        False, description="let requests bring their own chat template (runs their Jinja)"
    )
    render_timeout_s: float = Field(
        10.0, gt=0, description="time budget for rendering and tokenizing one request's prompt"
    )
    max_waiting_requests: int | None = Field(
        None, ge=0, description="queued prompts beyond which requests get 503 (4 x max_num_seqs)"
    )
    max_waiting_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="queued prompt tokens beyond which requests get 503 "
        "(8 x engine.max_num_batched_tokens)",
    )
    grammar_compile_timeout_s: float = Field(
        10.0, gt=0, description="a response format or tool grammar compiling longer gets a 400"
    )
    max_request_bytes: int = Field(
        16 * 2**20,
        ge=1024,
        description="request bodies past this get 413; images come inside them as base64 "
        "data: URIs (4/3 of their bytes), so 16 MiB takes one 12 MiB image",
    )
    migration_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="times one streamed request (n=1) may resume on another replica after "
        "the replica serving it died or was stopped mid-stream; then a 503 error event. "
        "0: no migration",
    )
    stream_interval_s: float = Field(
        0.05,
        ge=0,
        le=1,
        description="a stream's tokens after its first are sent at most this often, those of "
        "several engine steps in one chunk (the first token and the finish go at once); each "
        "chunk costs the replica, the ingress and the proxy CPU (engine/output_stream.py). 0: "
        "one chunk per engine step",
    )
    log_requests: bool = Field(
        True,
        description="one line per HTTP request in the ingress replica's log: id, route, status, "
        "tokens in/out, TTFT, total time (serving/request_log.py)",
    )
    log_prompts: bool = Field(
        False, description="add each request's prompt text to its log line (log_requests)"
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_for(self, pool: str) -> EngineArgs:
        """The engine of one pool: its own `engine` keys over the top-level `engine`."""
        if pool not in ENGINE_POOLS:
            raise ValueError(f"{pool!r} runs no engine; engine pools are {', '.join(ENGINE_POOLS)}")
        override = getattr(self, pool).engine
        if override is None:
            return self.engine
        given = override.model_dump(include=override.model_fields_set)
        try:
            return EngineArgs.model_validate({**self.engine.model_dump(), **given})
        except ValidationError as e:
            # each part was valid alone: a rule spanning fields (speculative with
            # expert_parallel_size > 1) broke when the pool's keys met the top-level ones
            why = "; ".join(x["msg"].removeprefix("Value error, ") for x in e.errors())
            raise ValueError(f"{pool}.engine over the top-level engine: {why}") from None

    def max_model_len(self, disaggregated: bool) -> int | None:
        """The context the ingress admits: the shortest of the pools a request runs on (each
        may set its own); None: the model's own."""
        pools = ("prefill_server", "decode_server") if disaggregated else ("llm_server",)
        lens = [n for p in pools if (n := self.engine_for(p).max_model_len) is not None]
        return min(lens, default=None)

    def waiting_limits(self, pool: str = "llm_server") -> tuple[int, int]:
        """(prompts, prompt tokens) a replica of `pool` queues before refusing work with 503.
        The defaults scale with the replica's ranks: each has its own slots and step budget."""
        e = self.engine_for(pool)
        n = e.expert_parallel_size
        prompts = self.max_waiting_requests
        tokens = self.max_waiting_prompt_tokens or 8 * n * e.max_num_batched_tokens
        return (4 * n * e.max_num_seqs if prompts is None else prompts), tokens

    def serve_options(self, pool: str) -> dict:
        """Serve options of one deployment. An engine replica takes up to its running and
        waiting limits (twice, so streams finishing still count) and refuses the rest itself.
        A caller (the ingress) holds requests it has not yet assigned to a replica in Serve's
        queue: a burst passes through it, so it is bounded by one replica's worth, not by a
        handful (8 turned most of a 200-request burst into 503s while replicas had room). The
        ingress is async and cheap per request, so it takes many; the engines bound the work."""
        if pool == "ingress":
            return self.ingress.options(max_ongoing=1024, max_queued=1024)
        e = self.engine_for(pool)
        n = e.expert_parallel_size
        per_replica = n * e.max_num_seqs + self.waiting_limits(pool)[0]
        deployment = getattr(self, pool)
        out = deployment.options(max_ongoing=2 * per_replica, max_queued=per_replica)
        if n > 1:
            # one placement group per replica: bundle 0 holds the replica actor itself (Serve
            # places it there and requires its ray_actor_options to fit), bundles 1..N its
            # ranks; Serve removes the group, ranks included, with the replica. A pin goes into
            # every bundle, so that ranks spread over nodes (PACK, SPREAD) stay on pinned ones;
            # the GPU type only into bundles with GPUs
            pins, accel = dict(deployment.resources), deployment.placement()
            rank = placement_bundle(e.rank_num_cpus, e.rank_num_gpus,
                                    accel if e.rank_num_gpus else pins)  # fmt: skip
            out["placement_group_bundles"] = [
                placement_bundle(deployment.num_cpus, deployment.num_gpus, accel),
                *[rank] * n,
            ]
            out["placement_group_strategy"] = e.placement_strategy
            out["health_check_period_s"] = EP_HEALTH_CHECK_PERIOD_S
            out["health_check_timeout_s"] = EP_HEALTH_CHECK_TIMEOUT_S
        return out

    def resolve_api_key(self) -> str | None:
        """The key from whichever of api_key, api_key_env and api_key_file is set."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(
                    f"api_key_env={self.api_key_env!r} names an environment variable that is "
                    "unset or empty on this replica; set it or drop api_key_env"
                )
            return key
        if self.api_key_file is not None:
            try:
                key = Path(self.api_key_file).read_text().strip()
            except OSError as e:
                raise ValueError(
                    f"api_key_file={self.api_key_file!r} cannot be read ({e.strerror}); "
                    "mount the file or drop api_key_file"
                ) from None
            if not key:
                raise ValueError(f"api_key_file={self.api_key_file!r} is empty")
            return key
        return None

    @model_validator(mode="after")
    def _one_key_source(self):
        given = [k for k in ("api_key", "api_key_env", "api_key_file") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"set one of {', '.join(given)}, not several")
        return self

    @model_validator(mode="after")
    def _accelerator_type_needs_gpus(self):
        for name in ("ingress", *ENGINE_POOLS):
            pool = getattr(self, name)
            if pool.accelerator_type is None:
                continue
            ep = self.engine_for(name) if name in ENGINE_POOLS else None
            rank_gpus = ep is not None and ep.expert_parallel_size > 1 and ep.rank_num_gpus > 0
            if pool.num_gpus <= 0 and not rank_gpus:
                raise ValueError(
                    f"{name}.accelerator_type={pool.accelerator_type!r} pins a pool that uses "
                    f"no GPU ({name}.num_gpus=0); give it GPUs or drop accelerator_type"
                )
        return self

    @model_validator(mode="after")
    def _gpu_needs_cuda(self):
        for name in ENGINE_POOLS:
            if getattr(self, name).num_gpus > 0 and self.device != "cuda":
                raise ValueError(f"{name}.num_gpus > 0 needs device: cuda")
        return self

    def _setting(self, pool: str, key: str) -> str:
        """An engine setting of a pool as the YAML spells it: the pool's own key if it set one."""
        override = getattr(self, pool).engine
        given = override is not None and key in override.model_fields_set
        return f"{pool}.engine.{key}" if given else f"engine.{key}"

    @model_validator(mode="after")
    def _rank_resources(self):
        for pool in ENGINE_POOLS:
            e = self.engine_for(pool)
            where = lambda key, pool=pool: self._setting(pool, key)  # noqa: E731
            if e.rank_num_gpus > 0 and self.device != "cuda":
                raise ValueError(
                    f"{where('rank_num_gpus')}={e.rank_num_gpus:g} needs device: cuda; "
                    "set device: cuda or rank_num_gpus: 0"
                )
            if self.device == "cuda" and e.expert_parallel_size > 1 and e.rank_num_gpus < 1:
                raise ValueError(
                    f"{where('expert_parallel_size')}={e.expert_parallel_size} on device cuda "
                    f"needs a whole GPU per rank (NCCL takes one GPU per rank), but "
                    f"{where('rank_num_gpus')}={e.rank_num_gpus:g}; set rank_num_gpus: 1"
                )
        return self
