"""Checkpoint -> parameters, through one mapping table.

A checkpoint name is first stripped of the text prefix (`model.language_model.` or `model.`);
what remains is either one of our parameter names (copied as is) or matches a row of
`SPECIAL_NAMES`, whose loader splits or stacks it into our layout. Any name that fits neither is
an error naming it, and so is any parameter left unfilled. FP8 block-quantised weights are
dequantised with their `weight_scale_inv` first.

Under expert parallelism a rank loads only its range of routed experts: fused expert tensors
are sliced in the file (safetensors reads just those rows), per-expert tensors of other ranks
are skipped unread, and only the rank's own experts must be present.
"""

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from qwen35_ray.model.config import ModelConfig

SKIPPED_PREFIXES = ("model.visual.", "visual.")


class CheckpointError(ValueError):
    pass


PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_EXPERTS = re.compile(r"^.*\.mlp\.experts\.(gate_up|down)_proj$")


def _expert(model, config, m, tensor, filled, experts):
    """Per-expert tensor -> one row of the fused [E_local, 2I, H] / [E_local, H, I] parameter."""
    base, e, kind = m.group(1), int(m.group(2)), m.group(3)
    I = config.moe_intermediate_size
    if kind == "down":
        target, rows = f"{base}.down_proj", slice(None)
    else:
        target, rows = f"{base}.gate_up_proj", slice(0, I) if kind == "gate" else slice(I, 2 * I)
    _param(model, target)[e - experts.start, rows].copy_(tensor)
    filled.setdefault(target, set()).add((e, kind))


def _qkvz(model, config, m, tensor, filled, experts):
    """Qwen3-Next in_proj_qkvz, grouped per key head as [q, k, v-group, z-group]."""
    H, HV = config.linear_num_key_heads, config.linear_num_value_heads
    K, V, G = config.linear_key_head_dim, config.linear_value_head_dim, HV // H
    w = tensor.view(H, 2 * K + 2 * G * V, -1)
    q, k, v, z = w.split([K, K, G * V, G * V], dim=1)
    hidden = w.shape[-1]
    qkv = torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])
    for name, value in (
        (f"{m.group(1)}.in_proj_qkv.weight", qkv),
        (f"{m.group(1)}.in_proj_z.weight", z.reshape(-1, hidden)),
    ):
        _param(model, name).copy_(value)
        filled[name] = True


def _ba(model, config, m, tensor, filled, experts):
    """Qwen3-Next in_proj_ba, grouped per key head as [b-group, a-group]."""
    H, HV = config.linear_num_key_heads, config.linear_num_value_heads
    b, a = tensor.view(H, 2 * (HV // H), -1).chunk(2, dim=1)
    for name, value in (
        (f"{m.group(1)}.in_proj_b.weight", b),
        (f"{m.group(1)}.in_proj_a.weight", a),
    ):
        _param(model, name).copy_(value.reshape(HV, -1))
        filled[name] = True


SPECIAL_NAMES: list[tuple[re.Pattern, Callable]] = [
    (PER_EXPERT, _expert),
    (re.compile(r"^(.*\.linear_attn)\.in_proj_qkvz\.weight$"), _qkvz),
    (re.compile(r"^(.*\.linear_attn)\.in_proj_ba\.weight$"), _ba),
]


def _param(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name).data


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


# bytes read from each checkpoint file for its fingerprint: the header, then evenly spaced samples
FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 16, 4096


def weights_fingerprint(path: Path) -> str:
    """A 16-hex hash that tells checkpoints apart without reading them whole: the index, and
    per file its name, size, safetensors header (names, shapes, dtypes, offsets) and 16
    evenly spaced 4 KiB samples of its data. Two trainings of one architecture differ in
    every sample; a change confined to a few tensors can go unseen."""
    h = hashlib.sha256()
    index = path / "model.safetensors.index.json"
    if index.exists():
        h.update(index.read_bytes())
    for file in checkpoint_files(path):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
            start = 8 + n
            step = max((size - start) // FINGERPRINT_SAMPLES, 1)
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(min(start + k * step, size))
                h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def tensor_fingerprint(model: nn.Module) -> str:
    """For a model built in memory (no checkpoint files): a hash of each parameter's name,
    shape, dtype and up to 256 evenly spaced values, so it costs little for a big model too."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        # gathered by index: no copy of the whole tensor, whatever its layout or device
        flat = torch.linspace(0, p.numel() - 1, min(p.numel(), 256), device=p.device).long()
        sample = p.detach()[torch.unravel_index(flat, p.shape)]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
    """w = q * scale per (block[0] x block[1]) tile; edge tiles may be partial."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows]
    return weight.float() * scale.repeat_interleave(block[1], 1)[:, :cols]


def load_weights(
    model: nn.Module,
    config: ModelConfig,
    path: Path,
    with_mtp: bool,
    progress: bool = True,
    experts: range | None = None,
) -> None:
    """Fill the model's parameters from the checkpoint at `path`; `experts` is the range of
    routed experts the model holds (all of them by default)."""
    experts = range(config.num_experts) if experts is None else experts
    names: dict[str, Path] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), "pt") as f:
            names.update((k, file) for k in f.keys())
    wanted = [
        n
        for n in sorted(names)
        if not n.startswith(SKIPPED_PREFIXES)
        and not n.endswith("weight_scale_inv")
        and (with_mtp or not n.startswith("mtp."))
        and not (config.tie_word_embeddings and n == "lm_head.weight")
        and _own_expert(n, experts)
    ]
    own = dict(model.named_parameters())
    filled: dict[str, object] = {}
    handles = {}
    try:
        for name in tqdm(wanted, desc="Loading weights", unit="tensor", disable=not progress):
            file = names[name]
            if file not in handles:
                handles[file] = safe_open(str(file), "pt")
            tensor = _read(handles[file], name, config, experts)
            scale_name = name.removesuffix("weight") + "weight_scale_inv"
            if scale_name in names:
                if config.fp8_block_size is None:
                    raise CheckpointError(f"{scale_name} found but config has no fp8 quantization")
                scale = safe_open(str(names[scale_name]), "pt").get_tensor(scale_name)
                tensor = dequantize_fp8(tensor, scale, config.fp8_block_size)
            _load_one(model, config, own, name, tensor, filled, experts)
    finally:
        handles.clear()
    _check_complete(config, own, filled, experts)


def _own_expert(name: str, experts: range) -> bool:
    """False for a per-expert tensor of an expert another rank holds."""
    m = PER_EXPERT.match(name)
    return m is None or int(m.group(2)) in experts


def _read(handle, name: str, config: ModelConfig, experts: range) -> torch.Tensor:
    if not FUSED_EXPERTS.match(name):
        return handle.get_tensor(name)
    piece = handle.get_slice(name)
    shape = piece.get_shape()
    if shape[0] != config.num_experts:
        raise CheckpointError(
            f"tensor {name} has shape {tuple(shape)}, expected {config.num_experts} experts first"
        )
    return piece[experts.start : experts.stop]


def _internal_name(config: ModelConfig, name: str) -> str:
    if name.startswith(config.weight_prefix):
        return name[len(config.weight_prefix) :]
    return name


def _load_one(model, config, own, name, tensor, filled, experts):
    internal = _internal_name(config, name)
    if internal in own:
        param = own[internal]
        if param.shape != tensor.shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        filled[internal] = True
        return
    for pattern, loader in SPECIAL_NAMES:
        m = pattern.match(internal)
        if m:
            try:
                loader(model, config, m, tensor, filled, experts)
            except (AttributeError, RuntimeError) as e:
                raise CheckpointError(f"tensor {name} does not fit this model: {e}") from e
            return
    raise CheckpointError(f"unexpected tensor {name} in checkpoint (no parameter takes it)")


def _check_complete(config: ModelConfig, own: dict, filled: dict, experts: range) -> None:
    def external(n):
        return n if n.startswith("mtp.") or n == "lm_head.weight" else config.weight_prefix + n

    for n in own:
        got = filled.get(n)
        if got is True:
            continue
        if isinstance(got, set):
            kinds = ("down",) if n.endswith("down_proj") else ("gate", "up")
            missing = [(e, k) for e in experts for k in kinds if (e, k) not in got]
            if not missing:
                continue
            e, k = missing[0]
            base = external(n).rsplit(".", 1)[0]
            raise CheckpointError(f"missing tensor {base}.{e}.{k}_proj.weight in checkpoint")
        raise CheckpointError(f"missing tensor {external(n)} in checkpoint")
