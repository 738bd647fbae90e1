"""The vision side of Qwen3.5 against transformers: the tower, the image processor, the
multimodal positions and their rotation, and the tower loaded from the tiny checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from qwen35_kernels.rope import apply_rope, rope_inv_freq
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5TextRotaryEmbedding,
    apply_rotary_pos_emb,
)

from qwen35_ray.model.image_processor import (
    QWEN35_PREPROCESSOR,
    ImageProcessorConfig,
    image_grid,
    image_tokens,
    preprocess,
)
from qwen35_ray.model.mrope import apply_mrope, continuation_positions, mrope_positions
from qwen35_ray.model.source import resolve_model
from qwen35_ray.model.tiny.checkpoint import VISION as TINY_VISION
from qwen35_ray.model.vision import VisionTower, load_vision
from qwen35_ray.model.vision_config import VisionConfig
from qwen35_ray.model.weights import CheckpointError

# the tiny checkpoint's tower, and one differing in every dimension, patch and merge size
VISION_CONFIGS = {
    "tiny": {**TINY_VISION, "out_hidden_size": 128},
    "wide": dict(
        depth=2,
        hidden_size=48,
        intermediate_size=80,
        num_heads=3,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=3,
        temporal_patch_size=2,
        hidden_act="gelu",
        num_position_embeddings=36,
        out_hidden_size=40,
        deepstack_visual_indexes=[],
    ),
}
# grids (t, h, w) in patches: different sizes and aspect ratios, one smaller than the position
# table and one larger, and a 2-frame clip (frames attend separately)
GRIDS = {
    "tiny": [[1, 4, 6], [1, 10, 2], [1, 2, 2], [1, 12, 16], [2, 4, 4]],
    "wide": [[1, 6, 9], [1, 3, 3], [1, 12, 3], [1, 9, 15], [2, 3, 6]],
}


def hf_tower(raw: dict):
    config = transformers.models.qwen3_5.Qwen3_5VisionConfig(**raw)
    tower = transformers.Qwen3_5VisionModel(config).float().eval()
    gen = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return tower


@pytest.mark.parametrize("name", list(VISION_CONFIGS))
@torch.no_grad()
def test_tower_matches_transformers_on_images_of_several_shapes_in_one_call(name):
    raw = VISION_CONFIGS[name]
    ref = hf_tower(raw)
    ours = VisionTower(VisionConfig.from_dict(raw)).float().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    grid = torch.tensor(GRIDS[name])
    gen = torch.Generator().manual_seed(7)
    pixels = torch.randn(int(grid.prod(-1).sum()), ours.config.patch_dim, generator=gen)

    out = ours(pixels, grid)
    expected = ref(pixels, grid_thw=grid).pooler_output
    assert out.shape == (sum(ours.tokens_per_image(grid)), raw["out_hidden_size"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # each image attends to itself only: alone it gives the rows it gave in the batch
    first = int(grid[0].prod())
    alone = ours(pixels[:first], grid[:1])
    torch.testing.assert_close(alone, out[: ours.tokens_per_image(grid[:1])[0]])


def test_tower_has_the_release_checkpoints_tensor_names_and_shapes():
    raw = {"out_hidden_size": 4096, "deepstack_visual_indexes": []}
    with torch.device("meta"):
        ref = transformers.Qwen3_5VisionModel(transformers.Qwen3_5VisionConfig(**raw))
        ours = VisionTower(VisionConfig.from_dict(raw))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_tower_refuses_pixels_that_do_not_fit_their_grid():
    tower = VisionTower(VisionConfig.from_dict(TINY_VISION))
    with pytest.raises(ValueError, match="do not fit grid_thw"):
        tower(torch.zeros(15, tower.config.patch_dim), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="2x2 blocks"):
        tower(torch.zeros(12, tower.config.patch_dim), torch.tensor([[1, 4, 3]]))


def test_vision_config_refuses_what_the_tower_does_not_compute():
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        VisionConfig.from_dict({**TINY_VISION, "deepstack_visual_indexes": [0]})
    with pytest.raises(ValueError, match="vision_config.window_size"):
        VisionConfig.from_dict({**TINY_VISION, "window_size": 112})
    with pytest.raises(ValueError, match="rope_type"):
        VisionConfig.from_dict({**TINY_VISION, "rope_parameters": {"rope_type": "default"}})
    with pytest.raises(ValueError, match="hidden_act"):
        VisionConfig.from_dict({**TINY_VISION, "hidden_act": "relu"})
    assert VisionConfig.from_dict({**TINY_VISION, "model_type": "qwen3_5"}).depth == 1


def random_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


# odd sizes, tiny, wide, tall, transparent, grayscale, palette, and one whose width is 2.5
# merged patches (Python's round takes it down to 2, half to even)
IMAGES = [(33, 47, "RGB"), (5, 7, "RGB"), (300, 20, "RGB"), (20, 300, "RGB"), (64, 64, "RGBA")]
IMAGES += [(50, 41, "L"), (61, 33, "P"), (80, 48, "RGB")]


@pytest.mark.parametrize(
    "raw",
    [
        # bounds that make the images above go both up and down in size
        {**QWEN35_PREPROCESSOR, "size": {"shortest_edge": 4096, "longest_edge": 40960}},
        QWEN35_PREPROCESSOR,
        # min_pixels/max_pixels override size; Qwen2-VL's patch and mean
        {"min_pixels": 3136, "max_pixels": 12544, "size": {"shortest_edge": 1, "longest_edge": 2}},
    ],
    ids=["small-bounds", "qwen35", "qwen2vl"],
)
def test_processor_gives_transformers_pixels_exactly(raw):
    images = [random_image(w, h, mode, seed) for seed, (w, h, mode) in enumerate(IMAGES)]
    config = ImageProcessorConfig.from_dict(raw)
    expected = Qwen2VLImageProcessorPil(**raw)(images=images, return_tensors="pt")
    ours = preprocess(images, config)
    assert ours.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
    assert ours.tokens == [int(g.prod()) // config.merge_size**2 for g in ours.grid_thw]


def test_image_token_counts_follow_the_release_settings():
    config = ImageProcessorConfig.from_dict(QWEN35_PREPROCESSOR)
    reference = Qwen2VLImageProcessorPil(**QWEN35_PREPROCESSOR)
    for height, width in [(1080, 1920), (1, 150), (4000, 3000), (10000, 10000), (32, 32)]:
        grid = image_grid(height, width, config)
        assert grid[1] * grid[2] == reference.get_number_of_image_patches(height, width)
    # the figures: 1920x1080 is 2,040 tokens; 64 to 16,384 tokens an image
    assert image_tokens(image_grid(1080, 1920, config), config) == 2040
    assert image_tokens(image_grid(8, 8, config), config) == 64
    assert image_tokens(image_grid(10000, 10000, config), config) <= 16384
    with pytest.raises(ValueError, match="aspect ratio"):
        image_grid(1, 201, config)


def test_processor_settings_without_a_file_are_the_release_ones(tmp_path):
    vision = {**TINY_VISION, "patch_size": 14}
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": vision}))
    config = ImageProcessorConfig.from_pretrained(tmp_path)
    assert config == ImageProcessorConfig.from_dict({**QWEN35_PREPROCESSOR, "patch_size": 14})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessorConfig.from_pretrained(tmp_path)


IMAGE, START, END = 250, 251, 252


def prompt_with(grids, merge, seed):
    """Random text around each image's <|vision_start|> pads <|vision_end|>."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (5,), generator=gen).tolist()
    for t, h, w in grids:
        ids += [START] + [IMAGE] * (t * h * w // merge**2) + [END]
        ids += torch.randint(0, 200, (int(torch.randint(0, 4, (1,), generator=gen)),)).tolist()
    return ids


@pytest.mark.parametrize(
    "grids",
    [[], [[1, 12, 4]], [[1, 4, 4], [1, 2, 16], [1, 20, 6]]],
    ids=["text", "one-image", "three-images"],
)
def test_positions_match_transformers_get_rope_index(grids):
    raw = {**VISION_CONFIGS["tiny"], "model_type": "qwen3_5"}
    config = transformers.Qwen3_5Config(
        vision_config=raw, image_token_id=IMAGE, vision_start_token_id=START
    )
    with torch.device("meta"):
        ref = transformers.Qwen3_5Model(config)
    ids = prompt_with(grids, 2, seed=len(grids))
    grid = torch.tensor(grids, dtype=torch.long).view(-1, 3)
    input_ids = torch.tensor([ids])
    expected, delta = ref.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE).int(),
        image_grid_thw=grid if grids else None,
    )
    positions, ours_delta = mrope_positions(ids, grid, IMAGE, spatial_merge_size=2)
    assert torch.equal(positions, expected[:, 0])
    assert ours_delta == int(delta)
    # decode continues every axis from the cache length plus delta
    nxt = continuation_positions(len(ids), 3, ours_delta)
    assert nxt[:, 0].tolist() == [int(positions.max()) + 1] * 3
    with pytest.raises(ValueError, match="image"):
        mrope_positions(ids + [IMAGE], grid, IMAGE, spatial_merge_size=2)


@pytest.mark.parametrize(
    "head_dim,section", [(64, [3, 3, 2]), (256, [11, 11, 10])], ids=["tiny", "qwen35"]
)
def test_mrope_rotation_matches_transformers_and_reduces_to_rope_for_text(head_dim, section):
    text = transformers.Qwen3_5TextConfig(
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": section,
            "mrope_interleaved": True,
        },
    )
    rotary = Qwen3_5TextRotaryEmbedding(text)
    gen = torch.Generator().manual_seed(42)
    T = 37
    q = torch.randn(T, 4, head_dim, generator=gen)
    k = torch.randn(T, 2, head_dim, generator=gen)
    positions = torch.randint(0, 5000, (3, T), generator=gen)
    cos, sin = rotary(q, positions[:, None, :])  # [1, T, R]
    q_ref, k_ref = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    inv_freq = rope_inv_freq(head_dim // 4, 1e7)
    torch.testing.assert_close(apply_mrope(q, positions, inv_freq, section), q_ref[0])
    torch.testing.assert_close(apply_mrope(k, positions, inv_freq, section), k_ref[0])
    # the axes differ, so the sections matter
    assert not torch.allclose(apply_rope(q, positions[0], inv_freq), q_ref[0], atol=1e-3)
    text_only = positions[:1].expand(3, -1)
    torch.testing.assert_close(
        apply_mrope(q, text_only, inv_freq, section), apply_rope(q, positions[0], inv_freq)
    )


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model("qwen35-tiny")


@torch.no_grad()
def test_tiny_checkpoint_tower_matches_transformers_loaded_from_the_directory(tiny_path):
    ref = transformers.AutoModelForImageTextToText.from_pretrained(tiny_path, dtype=torch.float32)
    ours = load_vision(tiny_path, dtype=torch.float32)
    images = [random_image(w, h, mode, seed) for seed, (w, h, mode) in enumerate(IMAGES[:4])]
    raw = {**QWEN35_PREPROCESSOR, "size": {"shortest_edge": 4096, "longest_edge": 40960}}
    inputs = preprocess(images, ImageProcessorConfig.from_dict(raw))
    expected = ref.model.get_image_features(inputs.pixel_values, inputs.grid_thw).pooler_output
    out = ours(inputs.pixel_values, inputs.grid_thw)
    assert [len(e) for e in expected] == inputs.tokens
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_load_vision_names_a_missing_or_unexpected_tensor(tiny_path, tmp_path):
    with safe_open(str(tiny_path / "model.safetensors"), "pt") as f:
        visual = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.visual.")}
    (tmp_path / "config.json").write_text((tiny_path / "config.json").read_text())
    dropped = "model.visual.blocks.0.attn.qkv.bias"
    save_file({k: v for k, v in visual.items() if k != dropped}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=dropped):
        load_vision(tmp_path)
    extra = "model.visual.blocks.1.attn.qkv.bias"
    save_file({**visual, extra: visual[dropped].clone()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=extra):
        load_vision(tmp_path)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
@torch.no_grad()
def test_tower_in_bf16_errs_no_more_than_transformers_in_bf16(tiny_path, device):
    """Against the fp32 reference, our bf16 tower errs as transformers' bf16 model does
    (relative RMS error, measured on CPU: 3.14e-3 both)."""
    images = [
        random_image(w, h, "RGB", seed) for seed, (w, h) in enumerate([(640, 480), (90, 700)])
    ]
    inputs = preprocess(images, ImageProcessorConfig.from_dict(QWEN35_PREPROCESSOR))
    pixels, grid = inputs.pixel_values.to(device), inputs.grid_thw.to(device)

    def reference(dtype):
        model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_path, dtype=dtype)
        features = model.to(device).model.get_image_features(pixels, grid).pooler_output
        return torch.cat(features).float()

    exact, theirs = reference(torch.float32), reference(torch.bfloat16)
    ours = load_vision(tiny_path, dtype=torch.bfloat16, device=device)(pixels, grid)
    assert ours.dtype == torch.bfloat16
    assert relative_rms(ours.float() - exact, exact) <= 1.1 * relative_rms(theirs - exact, exact)


def relative_rms(error: torch.Tensor, reference: torch.Tensor) -> float:
    return (error.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
