"""KernelBackend: the ops a model's modules call, chosen once when the model is built.

`kernels` (EngineConfig.kernels, `LLM(model=..., kernels=...)`, load_model) names it:
- torch: the PyTorch paths of qwen35_kernels, on any device (on CUDA an honest reference);
- triton: the Triton kernels, as on a GPU. On CPU only under Triton's interpreter
  (TRITON_INTERPRET=1 before the kernels are imported), which is slow and meant for tests;
- auto: triton on CUDA, torch elsewhere (what each op's own `x.is_cuda` dispatch does).

Ops without a Triton kernel run the same PyTorch code in both: the KV cache write (an indexed
copy), RoPE, the projections and the embedding. Under triton the GDN decay and write strength
(gdn_gating) are computed inside the gated delta rule kernels.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from qwen35_kernels.attention import paged_attention_torch, paged_attention_triton, write_kv
from qwen35_kernels.conv1d import (
    causal_conv1d_update_torch,
    causal_conv1d_update_triton,
    causal_conv1d_varlen_torch,
    causal_conv1d_varlen_triton,
)
from qwen35_kernels.gdn import (
    chunk_gated_delta_rule_with_gating_torch,
    chunk_gated_delta_rule_with_gating_triton,
    fused_recurrent_gated_delta_rule_with_gating_torch,
    fused_recurrent_gated_delta_rule_with_gating_triton,
)
from qwen35_kernels.moe import (
    fused_moe_torch,
    fused_moe_triton,
    topk_softmax_torch,
    topk_softmax_triton,
)
from qwen35_kernels.norm import (
    gated_rms_norm_torch,
    gated_rms_norm_triton,
    rms_norm_torch,
    rms_norm_triton,
)
from qwen35_kernels.triton_utils import INTERPRET

KERNELS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of every op the model calls; each takes the arguments of the
    qwen35_kernels function of the same name (the GDN rules are the `_with_gating` ones)."""

    name: str  # torch or triton
    rms_norm: Callable
    gated_rms_norm: Callable
    write_kv: Callable
    paged_attention: Callable
    causal_conv1d_varlen: Callable
    causal_conv1d_update: Callable
    chunk_gated_delta_rule: Callable
    fused_recurrent_gated_delta_rule: Callable
    topk_softmax: Callable
    fused_moe: Callable

    @property
    def is_torch(self) -> bool:
        """The PyTorch paths: what CPU decode over DecodeKV copies and the compiled decode
        step (engine/decode_graph.py) are made of."""
        return self.name == "torch"


TORCH = KernelBackend(
    name="torch",
    rms_norm=rms_norm_torch,
    gated_rms_norm=gated_rms_norm_torch,
    write_kv=write_kv,
    paged_attention=paged_attention_torch,
    causal_conv1d_varlen=causal_conv1d_varlen_torch,
    causal_conv1d_update=causal_conv1d_update_torch,
    chunk_gated_delta_rule=chunk_gated_delta_rule_with_gating_torch,
    fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule_with_gating_torch,
    topk_softmax=topk_softmax_torch,
    fused_moe=fused_moe_torch,
)

TRITON = KernelBackend(
    name="triton",
    rms_norm=rms_norm_triton,
    gated_rms_norm=gated_rms_norm_triton,
    write_kv=write_kv,
    paged_attention=paged_attention_triton,
    causal_conv1d_varlen=causal_conv1d_varlen_triton,
    causal_conv1d_update=causal_conv1d_update_triton,
    chunk_gated_delta_rule=chunk_gated_delta_rule_with_gating_triton,
    fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule_with_gating_triton,
    topk_softmax=topk_softmax_triton,
    fused_moe=fused_moe_triton,
)


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNELS)}")


def kernel_backend(kernels: str | KernelBackend, device: str | torch.device) -> KernelBackend:
    """The backend `kernels` names for a model on `device`."""
    if isinstance(kernels, KernelBackend):
        return kernels
    check_kernels(kernels)
    cuda = torch.device(device).type == "cuda"
    if kernels == "auto":
        return TRITON if cuda else TORCH
    if kernels == "triton" and not cuda and not INTERPRET.value:
        raise ValueError(
            f"kernels='triton' on device={torch.device(device).type} needs Triton's CPU "
            "interpreter, which is off in this process: set TRITON_INTERPRET=1 in the "
            "environment before starting it (slow, for tests), or use kernels='torch' or 'auto'"
        )
    return TRITON if kernels == "triton" else TORCH


def check_model_kernels(model, kernels: str, device) -> None:
    """The model's kernel backend, chosen when it was loaded, is the one EngineConfig.kernels
    names for this device."""
    built = getattr(model, "kernels", None)
    wanted = kernel_backend(kernels, device)
    if built is not None and built is not wanted:
        raise ValueError(
            f"EngineConfig.kernels={kernels!r} means the {wanted.name} kernels on "
            f"{torch.device(device).type}, but the model was loaded with the {built.name} "
            f"kernels; load it with load_model(..., kernels={kernels!r})"
        )
