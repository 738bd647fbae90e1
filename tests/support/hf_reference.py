"""Random small transformers models (the numerical oracle), saved as checkpoints for our loader."""

import math
from pathlib import Path

import torch
import transformers

TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    rms_norm_eps=1e-6,
)
MOE = dict(
    num_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)


def hf_config(kind: str, **text):
    """`text`: settings of the text model on top of TEXT (e.g. rope_parameters)."""
    if kind == "qwen3_5_moe":
        return transformers.Qwen3_5MoeConfig(
            text_config={**TEXT, **MOE, **text}, vision_config=VISION
        )
    if kind == "qwen3_5":
        return transformers.Qwen3_5TextConfig(**TEXT, intermediate_size=96, **text)
    if kind == "qwen3_next":
        # layer 2 dense: exercises mlp_only_layers
        return transformers.Qwen3NextConfig(
            **TEXT, **MOE, intermediate_size=96, mlp_only_layers=[2], **text
        )
    raise ValueError(kind)


def hf_model(kind: str, **text):
    config = hf_config(kind, **text)
    cls = {
        "qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration,
        "qwen3_5": transformers.Qwen3_5ForCausalLM,
        "qwen3_next": transformers.Qwen3NextForCausalLM,
    }[kind]
    torch.manual_seed(42)
    model = cls(config).float().eval()
    randomize(model)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 42) -> None:
    """Weights that make every path matter: O(1) activations, non-trivial norms and gates."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=gen).log())
        elif name.endswith("dt_bias"):
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
        elif name.endswith("linear_attn.norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "norm" in name:
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def text_model(model):
    """The decoder stack of any of the three classes (for hidden states)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def fuse_experts(tensors):
    """The BF16 release layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    out = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    layers = {n.split(".mlp.experts.")[0] for n in tensors if ".mlp.experts." in n}
    for layer in layers:
        E = len({n for n in tensors if n.startswith(f"{layer}.mlp.experts.") and "down" in n})
        w = [
            {k: tensors[f"{layer}.mlp.experts.{e}.{k}_proj.weight"] for k in ("gate", "up", "down")}
            for e in range(E)
        ]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([x["gate"], x["up"]]) for x in w]
        )
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([x["down"] for x in w])
    return out
