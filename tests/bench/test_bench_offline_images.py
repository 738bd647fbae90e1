"""`qwen35-ray bench offline --images` at tiny sizes: it runs from the CLI, writes its JSON,
and its counts agree with each other and with the engine's (no timing thresholds)."""

import json

from qwen35_ray.cli import main
from qwen35_ray.model.image_processor import ImageProcessorConfig, image_grid, image_tokens
from qwen35_ray.model.source import resolve_model


def test_bench_offline_images_reports_encoder_time_and_prompt_tokens(tmp_path):
    out = tmp_path / "images.json"
    argv = ["bench", "offline", "--images", "2", "--image-size", "256x256", "64x96"]
    argv += ["--num-prompts", "3", "--new-tokens", "3", "--concurrency", "3", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "offline-images" and report["command"].endswith(str(out))
    processor = ImageProcessorConfig.from_pretrained(resolve_model("qwen35-tiny"))
    rows = report["results"]
    assert [r["image_size"] for r in rows] == ["256x256", "64x96"]
    for row in rows:
        img, text = row["with_images"], row["text_only"]
        # every image is new: prepared once, encoded once, nothing cached
        assert img["images"] == img["encoder_images"] == 3 * 2
        assert img["encoder_cache_hits"] == img["prefix_cache_hit_tokens"] == 0
        assert img["encoder_s"] > 0 and img["preprocess_s"] > 0
        assert img["encoder_ms_per_image"] > 0
        # the engine computed every prompt token, image pads expanded: 32 text tokens, then
        # per image vision_start, its pads, vision_end
        assert img["prompt_tokens"] == img["prompt_tokens_computed"]
        assert img["prompt_tokens"] == 3 * 32 + 2 * 3 * 2 + img["image_tokens"]
        w, h = map(int, row["image_size"].split("x"))
        per_image = image_tokens(image_grid(h, w, processor), processor)
        assert img["image_tokens"] == 3 * 2 * per_image
        # the text twin: the same prompt tokens, no images
        assert text["prompt_tokens"] == text["prompt_tokens_computed"] == img["prompt_tokens"]
        assert text["image_tokens"] == text["images"] == text["encoder_images"] == 0
        assert text["encoder_s"] == 0
        for r in (img, text):
            assert r["prefill_step_s"] > 0 and r["prompt_tokens_per_s"] > 0
            assert 0 < r["ttft_s_median"] <= r["ttft_s_max"] <= r["seconds"]
            assert r["output_tokens_per_s"] > 0
