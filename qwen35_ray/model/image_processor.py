"""Images -> the vision tower's inputs, as transformers' Qwen2-VL image processor (its Pillow
variant, `Qwen2VLImageProcessorPil`) prepares them for Qwen3.5.

Per image: convert to RGB (transparency composited onto white); resize with Pillow (bicubic) to
the size `smart_resize` picks, each side a multiple of patch x merge (32 for Qwen3.5) and the
area within [min_pixels, max_pixels], aspect ratio kept as closely as that allows; scale to
[0, 1]; normalise by mean and std; repeat the still frame `temporal_patch_size` times; cut into
patches flattened as [C, T, P, P] in merge-block order (the merge x merge patches of one text
token consecutive, blocks in raster order). An image becomes grid (1, h/P, w/P) and
h*w / (P*merge)^2 `<|image_pad|>` tokens in the prompt.

Settings come from the checkpoint's preprocessor_config.json; a field it omits takes the value
transformers' Qwen2-VL processor gives it. A checkpoint without that file gets what the Qwen3.5
releases ship (`QWEN35_PREPROCESSOR`), its patch geometry read from config.json's vision_config.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# transformers' Qwen2VLImageProcessorPil class defaults: a field the file omits takes these
QWEN2VL_DEFAULTS = {
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 1 / 255,
    "resample": Image.Resampling.BICUBIC,
}
# the preprocessor_config.json of the Qwen3.5 releases
QWEN35_PREPROCESSOR = {
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
# steps the processor can skip; this one always runs them all
REQUIRED_STEPS = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    resample: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        # RGB
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, raw: dict) -> "ImageProcessorConfig":
        for step in REQUIRED_STEPS:
            if raw.get(step) is False:
                raise ValueError(
                    f"preprocessor_config.json sets {step}=false, which this image processor "
                    "does not honour (it always converts, resizes, rescales and normalises)"
                )
        values = {k: raw.get(k, v) for k, v in QWEN2VL_DEFAULTS.items()}
        size = raw.get("size") or {}
        # transformers: min_pixels/max_pixels, when given, override size's edges
        for field, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if raw.get(field) is None and edge in size:
                values[field] = size[edge]
        return cls(
            **{k: int(values[k]) for k in ("patch_size", "temporal_patch_size", "merge_size")},
            min_pixels=int(values["min_pixels"]),
            max_pixels=int(values["max_pixels"]),
            image_mean=tuple(float(v) for v in values["image_mean"]),
            image_std=tuple(float(v) for v in values["image_std"]),
            rescale_factor=float(values["rescale_factor"]),
            resample=int(values["resample"]),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageProcessorConfig":
        path = Path(path)
        file = path / "preprocessor_config.json"
        if file.exists():
            return cls.from_dict(json.loads(file.read_text()))
        vision = json.loads((path / "config.json").read_text()).get("vision_config") or {}
        geometry = {
            "patch_size": vision.get("patch_size", QWEN35_PREPROCESSOR["patch_size"]),
            "temporal_patch_size": vision.get("temporal_patch_size", 2),
            "merge_size": vision.get("spatial_merge_size", 2),
        }
        return cls.from_dict({**QWEN35_PREPROCESSOR, **geometry})


@dataclass(frozen=True)
class ImageInputs:
    pixel_values: torch.Tensor  # [N patches, C*T*P*P] fp32
    grid_thw: torch.Tensor  # [images, 3] long
    tokens: list[int]  # <|image_pad|> tokens of each image


def smart_resize(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of patch x merge, the area within
    [min_pixels, max_pixels]. A ValueError for an aspect ratio past 200."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {width}x{height} pixels has an aspect ratio past {MAX_ASPECT_RATIO}; "
            "crop or pad it"
        )
    f = config.factor
    # Python's round (half to even), as transformers rounds
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
    elif h * w < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


def image_grid(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int, int]:
    """The grid (t, h, w) in patches of an image of height x width pixels, without reading it."""
    h, w = smart_resize(height, width, config)
    return 1, h // config.patch_size, w // config.patch_size


def image_tokens(grid_thw: Sequence[int], config: ImageProcessorConfig) -> int:
    """The number of <|image_pad|> tokens an image of grid (t, h, w) takes in the prompt."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // config.merge_size**2


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers converts)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def patchify(pixels: np.ndarray, config: ImageProcessorConfig) -> torch.Tensor:
    """[C, H, W] -> [H/P * W/P, C*T*P*P], the still frame repeated T times, merge-block order."""
    C, H, W = pixels.shape
    P, m, T = config.patch_size, config.merge_size, config.temporal_patch_size
    x = torch.from_numpy(pixels).view(C, H // P // m, m, P, W // P // m, m, P)
    # (block row, block col, row in block, col in block, C, P, P)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(*x.shape[:5], T, P, P)
    return x.reshape((H // P) * (W // P), C * T * P * P)


def _normalised_bytes(config: ImageProcessorConfig) -> np.ndarray:  # [256, C] fp32
    """What each byte value becomes in each channel: rescaled in float64 then cast to float32,
    normalised in float32, the operations and order of transformers."""
    scaled = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return (scaled[:, None] - mean) / std


def preprocess_one(image: Image.Image, config: ImageProcessorConfig) -> tuple[torch.Tensor, tuple]:
    """One image -> (its patches [N, C*T*P*P], its grid (1, h, w))."""
    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, config)
    resized = rgb.resize((width, height), resample=Image.Resampling(config.resample))
    # a byte's value per channel, looked up: no float64 copy of a 16-megapixel image
    values = _normalised_bytes(config)[np.asarray(resized), np.arange(3)]  # [H, W, C]
    pixels = np.ascontiguousarray(values.transpose(2, 0, 1))  # [C, H, W]
    grid = (1, height // config.patch_size, width // config.patch_size)
    return patchify(pixels, config), grid


def preprocess(images: Sequence[Image.Image], config: ImageProcessorConfig) -> ImageInputs:
    """Images -> the vision tower's pixel_values and grid_thw, images in order."""
    patches, grids = [], []
    for image in images:
        p, g = preprocess_one(image, config)
        patches.append(p)
        grids.append(g)
    return ImageInputs(
        pixel_values=torch.cat(patches) if patches else torch.zeros(0, config.patch_dim),
        grid_thw=torch.tensor(grids, dtype=torch.long).view(-1, 3),
        tokens=[image_tokens(g, config) for g in grids],
    )
