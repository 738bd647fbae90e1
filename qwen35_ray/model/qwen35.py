"""Qwen35ForCausalLM: the text model of Qwen3.5 (dense and MoE) and Qwen3-Next, for serving.

It runs flat token batches: one ForwardBatch names the positions, GDN state slots and KV blocks
of every sequence in the step, and the HybridCache holds them. No padding, no per-request
Python objects inside the model.

Built with an ExpertShard, the model is one rank of an expert-parallel group (see
expert_parallel.py): it holds its shard of the routed experts and every other weight whole.

Its ops (norms, attention, conv, gated delta rule, router, experts) come from one KernelBackend
given when it is built (kernel_backend.py: the PyTorch paths or the Triton kernels), held by
every module that calls them.
"""

import torch
from torch import nn

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.decoder import DecoderLayer
from qwen35_ray.model.expert_load import ExpertLoad
from qwen35_ray.model.expert_parallel import ExpertParallel, ExpertShard
from qwen35_ray.model.kernel_backend import TORCH, KernelBackend
from qwen35_ray.model.mlp import Experts, SparseMoE
from qwen35_ray.model.mtp import MultiTokenPredictor
from qwen35_ray.model.norm import RMSNorm
from qwen35_ray.model.step import (
    PagedStep,
    SlotDecode,
    slot_decode_inputs,
    slot_decodes,
    store_slot_decode,
)
from qwen35_ray.model.verify import VerifyStep


class Qwen35ForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        with_mtp: bool = False,
        expert_shard: ExpertShard | None = None,
        kernels: KernelBackend = TORCH,
    ):
        super().__init__()
        self.config = config
        self.expert_shard = expert_shard
        self.kernels = kernels
        # one rank holding every expert needs no exchange
        self.expert_parallel = None
        if expert_shard is not None and expert_shard.size > 1:
            self.expert_parallel = _expert_parallel(config, with_mtp, expert_shard, kernels)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # each layer's index among its kind: of its GDN slots or attention blocks in the cache
        kinds = config.layer_types
        self.layers = nn.ModuleList(
            DecoderLayer(config, t, kinds[:i].count(t), moe, self.expert_parallel, kernels)
            for i, (t, moe) in enumerate(zip(kinds, config.moe_layers))
        )
        moe_layers = [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]
        # the served tokens' routing; the MTP layer's drafts are not tracked
        self.expert_load = ExpertLoad(moe_layers, config.num_experts) if moe_layers else None
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = None
        if with_mtp:
            if config.mtp_num_hidden_layers == 0:
                raise ValueError("this checkpoint has no MTP layer (mtp_num_hidden_layers=0)")
            # its KV caches come after the main attention layers'
            self.mtp = MultiTokenPredictor(config, kinds.count("full_attention"), kernels)

    def fuse_projections(self) -> None:
        """After loading: each layer's projections of one input become one matmul
        (model/linear.py)."""
        for layer in self.modules():
            if isinstance(layer, DecoderLayer):
                layer.fuse_projections()

    def forward(
        self,
        input_ids: torch.Tensor,
        batch: ForwardBatch,
        cache: HybridCache,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden] (after the last norm); the cache
        updated for the batch's tokens. embeds: (rows [n] long, values [n, hidden]) that
        replace those rows' token embeddings (an image's tokens: its vision tower output)."""
        if slot_decodes(batch, cache):
            inputs = slot_decode_inputs(batch, cache, len(self.config.attention_layers))
            step = SlotDecode(*inputs)
            hidden = self.hidden_states(input_ids, step)
            store_slot_decode(batch, cache, step.outputs())
        else:
            hidden = self.hidden_states(input_ids, PagedStep(batch, cache, self.kernels), embeds)
        if self.expert_load is not None:
            self.expert_load.end_step()
        return hidden

    def hidden_states(self, input_ids: torch.Tensor, step, embeds=None) -> torch.Tensor:
        """The layers over input_ids [T] in a step (model/step.py): final hidden states [T,
        hidden]. The one path of every step, eager, compiled or graph-captured. embeds: see
        forward."""
        x = self.embed_tokens(input_ids)
        if embeds is not None:
            rows, values = embeds
            x = x.index_copy(0, rows, values.to(x.dtype))
        for layer in self.layers:
            x = layer(x, step)
        return self.norm(x)

    def verify(
        self, input_ids: torch.Tensor, batch: ForwardBatch, cache: HybridCache, width: int
    ) -> tuple[torch.Tensor, VerifyStep]:
        """Speculative decoding's verification (model/verify.py): input_ids [B * width], each
        sequence's last sampled token then its drafts. Returns the final hidden states
        [B * width, hidden] and the step; its commit(kept) gives the GDN slots the states
        after each sequence's last kept token. K/V is written for all width positions."""
        step = VerifyStep(batch, cache, self.kernels, width)
        hidden = self.hidden_states(input_ids, step)
        if self.expert_load is not None:
            self.expert_load.end_step()
        return hidden, step

    def idle_forward(self) -> None:
        """A step without tokens on this rank: every MoE layer's exchange, in layer order, as
        forward() runs them, so the ranks that have tokens are not left waiting."""
        if self.expert_parallel is None:
            return
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.idle()
        self.expert_load.end_step()

    def resident_expert_bytes(self) -> int:
        """Bytes of the routed experts this rank holds."""
        return sum(
            p.numel() * p.element_size()
            for m in self.modules()
            if isinstance(m, Experts)
            for p in m.parameters()
        )

    def total_expert_bytes(self) -> int:
        """Bytes of the routed experts of all ranks together."""
        E = self.config.num_experts
        return sum(
            p.numel() // p.shape[0] * E * p.element_size()
            for m in self.modules()
            if isinstance(m, Experts)
            for p in m.parameters()
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        weight = (
            self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        )
        return torch.nn.functional.linear(hidden, weight).float()

    def mtp_forward(
        self,
        input_ids: torch.Tensor,  # [T] the token after each position
        hidden: torch.Tensor,  # [T, hidden] the main model's final hidden states
        batch: ForwardBatch,
        cache: HybridCache,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draft hidden states [T, hidden] of the MTP head, or [R, hidden] at rows only (its
        K/V is written at every position either); compute_logits gives its tokens."""
        if self.mtp is None:
            raise ValueError("the model was built without its MTP layer (with_mtp=False)")
        step = PagedStep(batch, cache, self.kernels)
        return self.mtp(self.embed_tokens(input_ids), hidden, step, rows)


def _expert_parallel(
    config: ModelConfig, with_mtp: bool, shard: ExpertShard, kernels: KernelBackend
) -> ExpertParallel:
    if shard.num_experts != config.num_experts:
        raise ValueError(
            f"the expert shard splits {shard.num_experts} experts but the model has "
            f"{config.num_experts}; build ExpertShard with num_experts=config.num_experts"
        )
    if with_mtp:
        raise ValueError(
            f"with_mtp=True is not supported with expert_parallel_size={shard.size} (the MTP "
            "layer's experts are not sharded yet); set with_mtp=False or expert_parallel_size=1"
        )
    return ExpertParallel(shard, experts=kernels.fused_moe)
