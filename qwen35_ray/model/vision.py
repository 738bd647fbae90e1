"""The Qwen3.5 vision tower (`model.visual.*`): image patches -> embeddings of the text width.

Per image of t x h x w patches (the processor's `grid_thw`; t is 1 for a still image):
1. patch embed: a 3D conv whose kernel equals its stride, so a linear map of each flattened
   [C, T, P, P] patch;
2. plus a learned square position table (side x side), resized bilinearly (align corners) to
   the image's h x w grid;
3. `depth` pre-norm blocks (LayerNorm, attention with a 2-D rotary embedding of each patch's
   (row, column), MLP), attention within one frame of one image only;
4. the merger: LayerNorm, then each merge x merge square of patches concatenated and mapped by
   a 2-layer MLP to `out_hidden_size`, the text model's width.
Patches arrive in merge-block order (the processor's): the merge x merge patches of one output
token are consecutive, blocks in raster order. Settings: model/vision_config.py.

Legend: N = patches of all images, D = vision width, Hd = heads, d = D / Hd, m = merge size.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from qwen35_ray.model.source import resolve_model
from qwen35_ray.model.vision_config import ACTIVATIONS, VisionConfig
from qwen35_ray.model.weights import CheckpointError, checkpoint_files, dequantize_fp8

PREFIXES = ("model.visual.", "visual.")


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, frames: list[int]):  # x [N, D], cos/sin [N, d] fp32
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).unbind(1)  # [N, Hd, d] each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = []
        # one frame attends to itself only: SDPA per frame, no [N, N] mask
        for qf, kf, vf in zip(q.split(frames), k.split(frames), v.split(frames)):
            o = F.scaled_dot_product_attention(
                qf.transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1)
            )  # [Hd, L, d]
            out.append(o.transpose(0, 1).reshape(o.shape[1], -1))
        return self.proj(torch.cat(out))


def _rotate(x, cos, sin):  # x [N, Hd, d], halves rotated, in fp32 as transformers does
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, frames: list[int]):
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # the checkpoint's Conv3d shape, so its tensor loads as is; applied as the linear map
        # it is (kernel == stride)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(
            torch.empty(config.hidden_size, config.in_channels, *kernel)
        )
        self.proj.bias = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, pixels):  # [N, C*T*P*P] -> [N, D]
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        width = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, config.out_hidden_size)

    def forward(self, x):  # [N, D] -> [N / m^2, out]
        x = self.norm(x).view(-1, self.linear_fc1.in_features)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """pixel_values [N, C*T*P*P] and grid_thw [images, 3] (as transformers' processor gives
    them) -> [sum over images of t*h*w / m^2, out_hidden_size], images in order."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        self._check(pixel_values, grids)
        if not grids:
            return pixel_values.new_zeros(0, self.config.out_hidden_size)
        x = self.patch_embed(pixel_values)
        x = x + self._positions(grids).to(x.dtype)
        cos, sin = self._rotary(grids, x.device)
        frames = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        return self.merger(x)

    def _check(self, pixel_values: torch.Tensor, grids: list[tuple]) -> None:
        m, width = self.config.spatial_merge_size, self.config.patch_dim
        bad = [g for g in grids if g[1] % m or g[2] % m or min(g) < 1]
        if bad:
            raise ValueError(f"image grid {bad[0]} is not whole {m}x{m} blocks of patches")
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (patches, width):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not fit grid_thw: "
                f"expected ({patches}, {width})"
            )

    def tokens_per_image(self, grid_thw: torch.Tensor) -> list[int]:
        return (grid_thw.prod(-1) // self.config.spatial_merge_size**2).tolist()

    def _block_order(self, grid: torch.Tensor) -> torch.Tensor:  # [h, w, ...] -> [h*w, ...]
        """Raster order -> merge-block order (the order the patches arrive in)."""
        m = self.config.spatial_merge_size
        h, w = grid.shape[:2]
        blocks = grid.reshape(h // m, m, w // m, m, *grid.shape[2:]).transpose(1, 2)
        return blocks.reshape(h * w, *grid.shape[2:])

    def _positions(self, grids) -> torch.Tensor:  # [N, D] fp32
        """The learned side x side table resized bilinearly (align corners) to each h x w."""
        side = self.config.grid_side
        table = self.pos_embed.weight.float().view(side, side, -1)
        out = []
        for t, h, w in grids:
            (r0, r1, fr), (c0, c1, fc) = _taps(h, side, table.device), _taps(w, side, table.device)
            top = table[r0][:, c0] * (1 - fc)[:, None] + table[r0][:, c1] * fc[:, None]
            bottom = table[r1][:, c0] * (1 - fc)[:, None] + table[r1][:, c1] * fc[:, None]
            grid = top * (1 - fr)[:, None, None] + bottom * fr[:, None, None]  # [h, w, D]
            out.append(self._block_order(grid).repeat(t, 1))
        return torch.cat(out)

    def _rotary(self, grids, device):  # cos, sin [N, d] fp32
        """2-D rotary: the first half of each head's frequencies turn with the patch's row,
        the second half with its column, at d/4 frequencies each."""
        half = self.config.head_dim // 2
        steps = torch.arange(0, half, 2, dtype=torch.float, device=device)
        inv_freq = 1.0 / self.config.rope_theta ** (steps / half)  # [d/4]
        rows, cols = [], []
        for t, h, w in grids:
            r, c = torch.meshgrid(
                torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
            )
            rows.append(self._block_order(r).repeat(t))
            cols.append(self._block_order(c).repeat(t))
        angles = torch.cat(
            [torch.cat(rows)[:, None] * inv_freq, torch.cat(cols)[:, None] * inv_freq], dim=-1
        )  # [N, d/2]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def _taps(size: int, side: int, device):
    """For `size` target points spread over `side` table entries, corners included: the lower
    and upper table index of each and the upper one's weight."""
    src = torch.arange(size, dtype=torch.float, device=device) * (side - 1) / max(size - 1, 1)
    low = src.floor()
    return low.long(), (low.long() + 1).clamp(max=side - 1), src - low


def load_vision(
    path: str | Path,
    config: VisionConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> VisionTower:
    """The vision tower of the checkpoint at `path` (a directory, hub id or embedded name; its
    `model.visual.*` tensors); `config` defaults to its config.json's vision_config. An
    unexpected or missing tensor is a CheckpointError naming it."""
    path = resolve_model(str(path))
    raw = json.loads((path / "config.json").read_text())
    config = config or VisionConfig.from_hf(path)
    with torch.device("meta"):
        tower = VisionTower(config)
    tower = tower.to_empty(device=device).to(dtype)
    own = dict(tower.named_parameters())
    block = (raw.get("quantization_config") or {}).get("weight_block_size")
    files = {}
    for file in checkpoint_files(path):
        handle = safe_open(str(file), "pt")
        files.update((k, handle) for k in handle.keys() if k.startswith(PREFIXES))
    filled = set()
    for name in sorted(files):
        if name.endswith("weight_scale_inv"):
            continue
        internal = name.removeprefix(PREFIXES[0]).removeprefix(PREFIXES[1])
        if internal not in own:
            raise CheckpointError(f"unexpected tensor {name} in checkpoint (no parameter takes it)")
        tensor = files[name].get_tensor(name)
        scale = name.removesuffix("weight") + "weight_scale_inv"
        if scale in files:
            if block is None:
                raise CheckpointError(f"{scale} found but config has no fp8 weight_block_size")
            tensor = dequantize_fp8(tensor, files[scale].get_tensor(scale), tuple(block))
        if tensor.shape != own[internal].shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(own[internal].shape)}"
            )
        with torch.no_grad():
            own[internal].copy_(tensor)
        filled.add(internal)
    missing = sorted(set(own) - filled)
    if missing:
        raise CheckpointError(f"missing tensor model.visual.{missing[0]} in checkpoint")
    return tower.eval().requires_grad_(False)


def has_vision(path: str | Path) -> bool:
    """The checkpoint at `path` holds a vision tower (`model.visual.*` tensors)."""
    path = resolve_model(str(path))
    for file in checkpoint_files(path):
        with safe_open(str(file), "pt") as handle:
            if any(k.startswith(PREFIXES) for k in handle.keys()):
                return True
    return False
