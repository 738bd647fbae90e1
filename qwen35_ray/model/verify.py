"""VerifyStep: the step of speculative decoding's verification (issue 22). Each sequence runs
`width` tokens after its cached ones (its last sampled token and width - 1 drafts) in one
forward of the main model, and keeps the GDN states after every one of them, so that a rejected
draft leaves no trace: `commit(kept)` writes each sequence's states after its last kept token
into its slots, with no recomputation.

- Attention: as a prefill chunk (causal over the paged K/V, the new K/V written for every
  position). K/V of rejected positions stay in the blocks past the sequence's length, where
  nothing reads them; the next step writes its own tokens over them.
- GDN: the conv and the gated delta rule run token by token on copies of the slot states (the
  slot-free single-token ops a decode uses), every intermediate state kept: [B, width, ...]
  per layer. The slots are untouched until commit.

Every sequence of the batch has exactly `width` new tokens (ForwardBatch chunks of that size).
Legend: B = sequences, n = width, C = conv channels, W = conv width, HV = value heads.
"""

import torch
from qwen35_kernels.conv1d import causal_conv1d_step
from qwen35_kernels.gdn import gated_delta_step, gdn_gating, prepare_qk

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.kernel_backend import KernelBackend
from qwen35_ray.model.step import PagedStep


class VerifyStep(PagedStep):
    def __init__(self, batch: ForwardBatch, cache: HybridCache, kernels: KernelBackend, width: int):
        super().__init__(batch, cache, kernels)
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        if any(n != width for n in lengths) or not bool(batch.has_initial_state.all()):
            raise ValueError(
                f"a verify step takes {width} tokens after cached state per sequence, got "
                f"chunks of {lengths}"
            )
        self.width = width
        # per GDN layer: [B, n, C, W-1] and [B, n, HV, K, V] fp32, the state after each token
        self.conv_states: dict[int, torch.Tensor] = {}
        self.recurrent_states: dict[int, torch.Tensor] = {}

    def _seqs(self, t: torch.Tensor) -> torch.Tensor:  # [B * n, ...] -> [B, n, ...]
        return t.view(self.batch.num_seqs, self.width, *t.shape[1:])

    def conv(self, layer: int, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        state = self.cache.conv[layer][self.batch.state_indices]
        xs, ys, kept = self._seqs(x), [], []
        for i in range(self.width):
            y, state = causal_conv1d_step(xs[:, i], weight, state)
            ys.append(y)
            kept.append(state)
        self.conv_states[layer] = torch.stack(kept, 1)
        return torch.stack(ys, 1).flatten(0, 1)

    def delta_rule(self, layer: int, q, k, v, a, b, A_log, dt_bias) -> torch.Tensor:
        g, beta = gdn_gating(a, b, A_log, dt_bias)
        q, k = prepare_qk(q, k, v.shape[1])
        q, k, vs, decay, beta = (self._seqs(t) for t in (q, k, v.float(), g.exp(), beta))
        state = self.cache.recurrent[layer][self.batch.state_indices].float()
        outs, kept = [], []
        for i in range(self.width):
            o, state = gated_delta_step(q[:, i], k[:, i], vs[:, i], decay[:, i], beta[:, i], state)
            outs.append(o)
            kept.append(state)
        self.recurrent_states[layer] = torch.stack(kept, 1)
        return torch.stack(outs, 1).flatten(0, 1).to(v.dtype)

    def commit(self, kept: list[int]) -> None:
        """kept[b]: the tokens of sequence b's width that stand (1 .. width; its last sampled
        token always does). Its GDN slots get the states after the last of them."""
        if len(kept) != self.batch.num_seqs or not all(1 <= n <= self.width for n in kept):
            raise ValueError(f"kept must give 1..{self.width} per sequence, got {kept}")
        rows = torch.arange(len(kept))
        last = torch.tensor(kept) - 1
        slots = self.batch.state_indices
        cache = self.cache
        for layer, states in self.conv_states.items():
            cache.conv[layer][slots] = states[rows, last].to(cache.conv.dtype)
        for layer, states in self.recurrent_states.items():
            cache.recurrent[layer][slots] = states[rows, last].to(cache.recurrent.dtype)
