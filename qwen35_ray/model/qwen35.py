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
        self.layers = nn.ModuleList(
            DecoderLayer(config, t, moe, self.expert_parallel, kernels)
            for t, moe in zip(config.layer_types, config.moe_layers)
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
            self.mtp = MultiTokenPredictor(config, kernels)
        # index of each layer's state in the HybridCache (GDN slots or attention blocks)
        kinds = config.layer_types
        self._cache_index = [kinds[:i].count(kinds[i]) for i in range(len(kinds))]

    def fuse_projections(self) -> None:
        """After loading: each layer's projections of one input become one matmul
        (model/linear.py)."""
        for layer in self.modules():
            if isinstance(layer, DecoderLayer):
                layer.fuse_projections()

    def forward(
        self, input_ids: torch.Tensor, batch: ForwardBatch, cache: HybridCache
    ) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden] (after the last norm)."""
        x = self.embed_tokens(input_ids)
        for layer, idx in zip(self.layers, self._cache_index):
            if layer.layer_type == "linear_attention":
                x = layer(x, batch, cache.conv[idx], cache.recurrent[idx])
            else:
                x = layer(x, batch, cache.key[idx], cache.value[idx], cache.decode_kv_of(idx))
        if self.expert_load is not None:
            self.expert_load.end_step()
        return self.norm(x)

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

    def decode_step(
        self,
        input_ids: torch.Tensor,  # [B] one token per sequence
        positions: torch.Tensor,  # [B]
        rows: torch.Tensor,  # [B] state slot of each sequence
        lengths: torch.Tensor,  # [R] earlier tokens of each slot's sequence
        conv: torch.Tensor,  # [n_gdn, S, C, W-1] the GDN state slots
        recurrent: torch.Tensor,  # [n_gdn, S, HV, K, V]
        keys: list[torch.Tensor],  # per attention layer [R, Hkv, n, D] earlier K (DecodeKV)
        values: list[torch.Tensor],
    ):
        """forward() + compute_logits() for a batch of decodes without writing the cache, so it
        can be compiled into one graph (CPU, torch kernel backend only): (logits [B, vocab]
        fp32, conv', recurrent' [n_gdn, B, ...] of the batch's sequences, the new keys and
        values [n_attn, B, Hkv, D]). The caller stores the states. The slots are read here,
        by `rows`, so a compiled graph reads them where they are instead of from a gathered
        copy."""
        x = self.embed_tokens(input_ids)
        new_conv, new_rec, new_k, new_v = [], [], [], []
        for layer, idx in zip(self.layers, self._cache_index):
            if layer.layer_type == "linear_attention":
                c, r = conv[idx][rows], recurrent[idx][rows]
                x, c, r = layer.decode_step(x, positions, rows, lengths, c, r)
                new_conv.append(c)
                new_rec.append(r)
            else:
                x, k, v = layer.decode_step(x, positions, rows, lengths, keys[idx], values[idx])
                new_k.append(k)
                new_v.append(v)
        logits = self.compute_logits(self.norm(x))
        return logits, *(torch.stack(t) for t in (new_conv, new_rec, new_k, new_v))

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
    ) -> torch.Tensor:
        """Draft hidden states [T, hidden] of the MTP head; compute_logits gives its tokens."""
        if self.mtp is None:
            raise ValueError("the model was built without its MTP layer (with_mtp=False)")
        first_kv = len(self.config.attention_layers)
        return self.mtp(self.embed_tokens(input_ids), hidden, batch, cache, first_kv)


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
