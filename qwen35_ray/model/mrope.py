"""Multimodal RoPE: (t, h, w) positions for a prompt with images, and the rotation they drive.

Positions, as transformers' `Qwen3_5Model.get_rope_index` computes them: text tokens count up
on all three axes alike; an image's t x h' x w' pad tokens (h' = h / merge, w' = w / merge,
merged-grid order) starting at position s get (s + t_i, s + i, s + j); the text after the image
resumes at s + max(h', w'). A prompt of T tokens whose positions end at P - 1 has
`delta = P - T`: zero for text only, negative with images (an image of h' x w' tokens advances
the position by max(h', w') only). Every token after the prompt (decode, or a resumed
request) sits at `index + delta` on all three axes, so a request carries its delta.

Rotation (interleaved M-RoPE): each of the R/2 rotary frequencies takes its angle from one axis:
frequency i from h when i % 3 == 1 and i < 3 * mrope_section[1], from w when i % 3 == 2 and
i < 3 * mrope_section[2], else from t. With the three axes equal (text) this is plain RoPE
(`qwen35_kernels.rope.apply_rope`).

Legend: T = tokens, H = heads, D = head dim, R = rotary dims.
"""

from collections.abc import Sequence

import torch
from qwen35_kernels.rope import rotate


def image_token_count(grid_thw: Sequence[int], spatial_merge_size: int) -> int:
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // spatial_merge_size**2


def mrope_positions(
    token_ids: Sequence[int],
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """Positions [3, T] (long) of one prompt and its delta. The prompt's `image_token_id`
    tokens belong to its images in order, `image_token_count` tokens each; a prompt whose pad
    tokens do not add up to its images is a ValueError."""
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw]
    is_image = [int(t) == image_token_id for t in token_ids]
    pieces, pos, i, image = [], 0, 0, 0
    while i < len(is_image):
        if not is_image[i]:
            # the text run up to the next image token
            try:
                j = is_image.index(True, i)
            except ValueError:
                j = len(is_image)
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        if image == len(grids):
            raise ValueError(
                f"the prompt has more image tokens than its {len(grids)} images fill "
                f"(token {i} is the first without an image)"
            )
        t, h, w = grids[image]
        m = spatial_merge_size
        n = image_token_count(grids[image], m)
        if not all(is_image[i : i + n]) or i + n > len(is_image):
            raise ValueError(
                f"image {image} (grid {t}x{h}x{w}) needs {n} consecutive image tokens "
                f"from token {i}; the prompt has fewer"
            )
        tt, hh, ww = torch.meshgrid(
            torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij"
        )
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos, i, image = pos + max(h, w) // m, i + n, image + 1
    if image != len(grids):
        raise ValueError(
            f"the prompt's image tokens fill {image} of its {len(grids)} images; "
            "each image needs its own run of image tokens"
        )
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long), 0
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - len(is_image)


def continuation_positions(start: int, length: int, delta: int) -> torch.Tensor:
    """Positions [3, length] of tokens `start .. start+length-1` of a sequence past its
    images (decode steps, or prompt text after the last image): index + delta on every axis."""
    return torch.arange(start + delta, start + delta + length).expand(3, -1)


def mrope_axes(rotary_dim: int, mrope_section: Sequence[int]) -> torch.Tensor:
    """For each of the R/2 frequencies the axis (0 t, 1 h, 2 w) its angle comes from."""
    axes = torch.zeros(rotary_dim // 2, dtype=torch.long)
    for axis in (1, 2):
        axes[axis : 3 * mrope_section[axis] : 3] = axis
    return axes


def apply_mrope(
    x: torch.Tensor,  # [T, H, D]
    positions: torch.Tensor,  # [3, T]
    inv_freq: torch.Tensor,  # [R/2]
    mrope_section: Sequence[int],
    scale: float = 1.0,
) -> torch.Tensor:
    """RoPE on the first R channels of each head (halves rotated, as `apply_rope`), each
    frequency turned by its axis's position; `scale` multiplies cos and sin in fp32."""
    R = inv_freq.shape[0] * 2
    axes = mrope_axes(R, mrope_section).to(positions.device)
    pos = positions.float().gather(0, axes[:, None].expand(-1, positions.shape[1]))  # [R/2, T]
    freqs = pos.T * inv_freq.to(x.device)[None, :]  # [T, R/2]
    return rotate(x, freqs, scale)
