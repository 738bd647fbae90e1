"""The tiny checkpoint's preprocessor_config.json: transformers' image processor loaded from the
directory prepares the pixels ours does, for images as media.py decodes them from data URIs."""

import base64
import io
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwen35_ray.model.image_processor import QWEN35_PREPROCESSOR, ImageProcessorConfig, preprocess
from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving.media import MediaLimits, load_image

# (width, height, mode): below the release minimum (upscaled), tall, wide, with transparency
IMAGES = [(200, 150, "RGB"), (90, 700, "RGB"), (640, 96, "RGBA"), (333, 257, "L")]


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model("qwen35-tiny")


def data_uri_part(width: int, height: int, mode: str, seed: int) -> tuple[dict, Image.Image]:
    gen = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    image = Image.fromarray(gen.integers(0, 256, shape, dtype=np.uint8), mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}, image


def test_tiny_checkpoint_ships_the_release_preprocessor_settings(tiny_path):
    raw = json.loads((tiny_path / "preprocessor_config.json").read_text())
    assert {k: raw[k] for k in QWEN35_PREPROCESSOR} == QWEN35_PREPROCESSOR
    config = ImageProcessorConfig.from_pretrained(tiny_path)
    assert config == ImageProcessorConfig.from_dict(QWEN35_PREPROCESSOR)
    assert (config.min_pixels, config.max_pixels) == (65536, 16777216)


@pytest.mark.parametrize(
    "load",
    [Qwen2VLImageProcessorPil.from_pretrained, transformers.AutoImageProcessor.from_pretrained],
    ids=["pil", "auto"],
)
def test_transformers_processor_from_the_tiny_directory_prepares_our_pixels(tiny_path, load):
    reference = load(tiny_path)
    assert isinstance(reference, Qwen2VLImageProcessorPil)
    parts, originals = zip(
        *(data_uri_part(w, h, mode, seed) for seed, (w, h, mode) in enumerate(IMAGES))
    )
    decoded = [load_image(p, MediaLimits()).image for p in parts]
    ours = preprocess(decoded, ImageProcessorConfig.from_pretrained(tiny_path))
    expected = reference(images=list(originals), return_tensors="pt")
    assert ours.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
