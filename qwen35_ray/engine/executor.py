"""The executor boundary: what runs the model (weights, caches, forward, sampling).

The LLMEngine keeps the scheduler and block accounting and hands each step to an Executor as a
StepBatch of plain data: chunks of token ids with their state slot and KV blocks, and for the
sequences that sample, what sampling needs of them (SampleRow). `InProcessExecutor` runs it in
this process; `qwen35_ray.distributed.RankExecutor` sends it to a Ray rank actor of an
expert-parallel group, which runs an InProcessExecutor over its shard of the experts.

Slot copies (prefix-cache snapshots) may be deferred, but stay in program order with every
later call: an executor applies them before the next step, read or write.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from qwen35_ray.engine import cuda_graph
from qwen35_ray.engine.cache_sizing import resolve_max_model_len
from qwen35_ray.engine.cuda_graph import uses_cuda_graphs
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.batch import SeqChunk
from qwen35_ray.model.cache import HybridCache


@dataclass
class SampleRow:
    """What sampling needs of one sequence; the sampler reads it as it reads a Sequence."""

    request_id: str
    params: SamplingParams
    # the draw uses sampler.token_seed(seed, position): the row carries no generator state
    seed: int
    position: int  # the output token number this row samples (tokens the sequence has)
    prompt_token_ids: list[int] = field(default_factory=list)  # only for repetition_penalty
    output_token_ids: list[int] = field(default_factory=list)  # only for penalties
    forced: int | None = None  # the thinking budget is spent: this token replaces the sample
    constrained: bool = False  # an active grammar: without its mask the row cannot sample


@dataclass
class SpecBatch:
    """The speculative part of a step (engine/spec_step.py). Its prompt chunks lead the
    batch; the verify rows follow, each its last token and k drafts (k + 1 chunk tokens)."""

    k: int
    num_prompt_chunks: int  # chunks before the verify rows
    # per verify row: its k drafts (the chunk's tokens after the first), the head's
    # distributions [k, V] they were drawn from (a sampled request's; None: drawn greedily),
    # and whether it may keep any (spec_accept.draft_mode)
    drafts: list[list[int]] = field(default_factory=list)
    q: list[Any] = field(default_factory=list)
    keeps: list[bool] = field(default_factory=list)
    # per prompt chunk, the tokens after its positions that are known: all of them, or all but
    # the last for the chunk that completes its sequence (its sampled token follows)
    next_ids: list[list[int]] = field(default_factory=list)


@dataclass
class StepBatch:
    """One step of one executor. An empty batch is a rank with nothing to do: it still runs
    the collectives of a forward, so that its expert-parallel peers do not wait forever."""

    chunks: list[SeqChunk] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)  # the chunks' new tokens, in order
    sampling: list[int] = field(default_factory=list)  # chunk index of each sampling row
    rows: list[SampleRow] = field(default_factory=list)
    # grammar masks of the rows (structured.Masks), or a Future of them filled while the model
    # runs in process; None when no row is constrained
    masks: Any = None
    restores: list[tuple[int, int]] = field(default_factory=list)  # (snapshot, slot) first
    # (rows of the step's tokens [k] long, values [k, hidden]): image embeddings replacing
    # those tokens' embeddings (engine/images.py)
    embeds: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    spec: SpecBatch | None = None  # speculative decoding's verify rows and drafts

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass
class StepResult:
    tokens: dict[int, tuple[int | None, dict | None]]  # chunk index -> (token, logprobs)
    # speculative decoding: the kept tokens that follow tokens[i] in the same step, and the
    # head's drafts for the sequence's next step, by chunk index
    more: dict[int, list[int]] = field(default_factory=dict)
    drafts: dict[int, list[int]] = field(default_factory=dict)
    draft_probs: dict[int, Any] = field(default_factory=dict)  # [k, V] of sampled requests


class Pending(Protocol):
    def result(self) -> StepResult: ...


class Executor(Protocol):
    def execute(self, batch: StepBatch) -> StepResult:
        """Raises errors.EngineDead when the model failed; a row whose own sampling failed
        gets the token None."""

    def submit(self, batch: StepBatch) -> Pending:
        """Start a step; its result() waits for it. Lets a group start every rank first."""

    def copy_slot(self, src: int, dst: int) -> None: ...

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The vision tower's output [image tokens, hidden] for a prompt's images."""

    def read_state(self, slot: int, block_table: list[int], num_tokens: int) -> dict: ...

    def write_state(self, slot: int, block_table: list[int], tensors: dict) -> None: ...

    def expert_load(self) -> Any:
        """The model's ExpertLoadSnapshot over its recent steps; None for a dense model."""

    def info(self) -> dict: ...

    def shutdown(self) -> None: ...


@dataclass
class Done:
    """A step that already ran."""

    value: StepResult

    def result(self) -> StepResult:
        return self.value


class InProcessExecutor:
    """The model and its HybridCache in this process."""

    @classmethod
    def create(
        cls, model, config, size, ec, dtype, device="cpu", vision=None
    ) -> "InProcessExecutor":
        """The model with a new HybridCache of `size` (engine.cache_sizing.CacheSize) and the
        compiled decode graphs when ec.compile_decode. The cache keeps DecodeKV copies only
        for a model on the torch kernels (model/kernel_backend.py). With ec.cuda_graphs the
        decode steps' CUDA graphs are captured now, over a cache with a scratch slot and block
        for their padding rows (engine/cuda_graph.py)."""
        if ec.speculative is not None:
            # every decode is a verify row (engine/spec_step.py): the compiled and captured
            # decode steps would never run; the MTP layer keeps K/V beside the main layers'
            cache = HybridCache.allocate(
                config, size.num_slots + size.num_snapshots, size.num_blocks, ec.block_size,
                dtype, device, with_mtp=True, decode_kv=_torch_kernels(model),
            )  # fmt: skip
            executor = cls(model, config, cache, device, vision=vision)
            if compiles_decode(ec.compile_decode, device, model):
                from qwen35_ray.engine.verify_graph import CompiledVerify

                compiled = CompiledVerify(model, cache, ec.speculative.k + 1, size.num_slots)
                executor.runner.compiled_verify = compiled
                compiled.warmup() if ec.compile_decode else compiled.start()
            return executor
        if uses_cuda_graphs(ec.cuda_graphs, device, model):
            max_len = resolve_max_model_len(config, ec)
            cache, graphs = cuda_graph.build(model, config, size, ec.block_size, max_len, dtype,
                                             device)  # fmt: skip
            return cls(model, config, cache, device, graphs=graphs, vision=vision)
        cache = HybridCache.allocate(
            config, size.num_slots + size.num_snapshots, size.num_blocks, ec.block_size, dtype,
            device, decode_kv=_torch_kernels(model),
        )  # fmt: skip
        compiled = None
        if compiles_decode(ec.compile_decode, device, model):
            from qwen35_ray.engine.decode_graph import CompiledDecode

            compiled = CompiledDecode(model, cache, size.num_slots)
            if ec.compile_decode:
                compiled.warmup()
            else:
                compiled.start()
        return cls(model, config, cache, device, compiled, vision=vision)

    def __init__(
        self, model, config, cache: HybridCache, device="cpu", compiled=None, graphs=None,
        vision=None,
    ):  # fmt: skip
        """vision: the checkpoint's VisionTower (model/vision.py), None for text only."""
        from qwen35_ray.engine.runner import ModelRunner

        self.model, self.config, self.cache = model, config, cache
        self.vision, self.device = vision, device
        self.runner = ModelRunner(model, cache, device, compiled, graphs)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the compiled decode step of a background compile; True once decode steps
        run compiled, False without one (or when it failed)."""
        compiled = self.runner.compiled_decode or self.runner.compiled_verify
        return compiled is not None and compiled.wait(timeout)

    def execute(self, batch: StepBatch) -> StepResult:
        for src, dst in batch.restores:
            self.cache.copy_slot(src, dst)
        if batch.empty:
            idle = getattr(self.model, "idle_forward", None)
            if idle is not None:
                # the model's buffers are inference tensors: only inference mode may update them
                with torch.inference_mode():
                    idle()
            return StepResult({})
        return self.runner.run(batch)

    def submit(self, batch: StepBatch) -> Done:
        return Done(self.execute(batch))

    def copy_slot(self, src: int, dst: int) -> None:
        self.cache.copy_slot(src, dst)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if self.vision is None:
            raise ValueError("this model was loaded without a vision tower")
        dtype = next(self.vision.parameters()).dtype
        with torch.inference_mode():
            return self.vision(pixel_values.to(self.device, dtype), grid_thw)

    def read_state(self, slot: int, block_table: list[int], num_tokens: int) -> dict:
        """The slot's GDN states and the K/V of its first num_tokens tokens; with the MTP
        layer (speculative decoding) its K/V too, as mtp_key and mtp_value."""
        n_attn = len(self.config.attention_layers)
        out = self.cache.read(slot, block_table, num_tokens, self.cache.key.shape[0])
        for name in ("key", "value"):
            if out[name].shape[0] > n_attn:
                out[name], out[f"mtp_{name}"] = out[name][:n_attn], out[name][n_attn:]
        return out

    def write_state(self, slot: int, block_table: list[int], tensors: dict) -> None:
        """read_state's inverse. The MTP layer's K/V, where one side has no MTP layer, is
        left out: without it an engine's drafts are poor until its own head has run over the
        positions (its output stays exact)."""
        tensors = dict(tensors)
        mtp = {name: tensors.pop(f"mtp_{name}", None) for name in ("key", "value")}
        n_attn = len(self.config.attention_layers)
        if self.cache.key.shape[0] > n_attn and mtp["key"] is not None:
            tensors = {**tensors, **{n: torch.cat([tensors[n], mtp[n]]) for n in mtp}}
        self.cache.write(slot, block_table, tensors)

    def expert_load(self):
        load = getattr(self.model, "expert_load", None)
        return load.snapshot() if load is not None else None

    def info(self) -> dict:
        m = self.model
        out = {"rank": 0, "expert_parallel_size": 1}
        if hasattr(m, "resident_expert_bytes"):
            out["expert_bytes"] = m.resident_expert_bytes()
            out["expert_bytes_total"] = m.total_expert_bytes()
        return out

    def shutdown(self) -> None:
        pass


def compiles_decode(setting: bool | None, device, model) -> bool:
    """EngineConfig.compile_decode resolved: True and False as given (True off the CPU, or on
    the Triton kernels, is an error); None (auto) compiles for a CPU model on the torch kernels
    in this process, not an expert-parallel rank (its MoE exchange cannot be in a graph),
    unless QWEN35_RAY_COMPILE_DECODE=0."""
    cpu = torch.device(device).type == "cpu"
    if setting is None:
        off = os.environ.get("QWEN35_RAY_COMPILE_DECODE", "1") == "0"
        single = getattr(model, "expert_parallel", None) is None
        return cpu and _torch_kernels(model) and single and not off
    if setting and not cpu:
        raise ValueError("compile_decode is for CPU engines")
    if setting and not _torch_kernels(model):
        raise ValueError(
            "compile_decode=True compiles the PyTorch paths, and this model runs the Triton "
            "kernels (kernels='triton'); set compile_decode=False or kernels='torch'"
        )
    return setting


def _torch_kernels(model) -> bool:
    """The model runs the PyTorch paths (model/kernel_backend.py)."""
    kernels = getattr(model, "kernels", None)
    return kernels is None or kernels.is_torch
