"""`qwen35-ray bench offline --images 1 --image-size 448x448`: prompts that carry images through
the engine, and what the images cost: the time preparing them (pixels, pad tokens, positions,
at admission), the time in the vision tower, prompt throughput and time to first token. Each
run is followed by a text twin: prompts of random text tokens as long as the image prompts
once their pads are expanded, on the same engine, so the image cost shows side by side.

The images are random pixels (seeded numpy), each new, so neither the encoder cache nor the
prefix cache hits (their hit counts are in the report to show it). Each run, image or text, is
done once first with other prompts and 2 new tokens, not counted: on a loaded CPU the first
prefill steps of a fresh engine took seconds longer than later ones of the same shapes.

Prompt throughput is the prompt tokens the model computed over the seconds of the steps that
computed any (a step that also decoded counts whole; the tower runs inside such a step). TTFT
is from add_request, which prepares the images, to the first token.
"""

import statistics
import sys
import time

import numpy as np
from PIL import Image

# random prompt text before the images, in tokens
TEXT_TOKENS = 32
# load_stats() counters read as deltas over a run
COUNTERS = (
    "prompt_tokens_computed_total",
    "prefix_cache_hits_total",
    "images_preprocessed_total",
    "image_preprocess_seconds_total",
    "encoder_images_total",
    "encoder_seconds_total",
    "encoder_cache_hits_total",
)


def parse_size(text: str) -> tuple[int, int]:
    """'448x448' -> (width, height)."""
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def random_images(n: int, size: tuple[int, int], rng: np.random.Generator) -> list[Image.Image]:
    w, h = size
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def image_prompts(engine, num_prompts: int, images: int, size, seed: int) -> list[tuple]:
    """(token ids, images) per prompt: TEXT_TOKENS random text tokens, then per image
    <|vision_start|><|image_pad|><|vision_end|> (the engine expands each pad)."""
    tok = engine.tokenizer
    start, pad, end = tok.convert_tokens_to_ids(
        ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    )
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_prompts):
        ids = rng.integers(0, text_vocab(engine), TEXT_TOKENS).tolist()
        out.append((ids + [start, pad, end] * images, random_images(images, size, rng)))
    return out


def text_vocab(engine) -> int:
    """Token ids below the first special token: plain text."""
    return min([engine.config.vocab_size, *engine.tokenizer.all_special_ids])


def run_prompts(engine, prompts: list[tuple], new_tokens: int, concurrency: int) -> dict:
    """The prompts (ids, images or None), `concurrency` in flight, greedy, new_tokens each."""
    from qwen35_ray.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    before = engine.load_stats()
    computed = engine.stats["prompt_tokens_computed"]
    todo = list(enumerate(prompts))[::-1]
    added, first, prompt_ids = {}, {}, {}
    prefill_s, running = 0.0, 0
    start = time.perf_counter()
    while todo or running:
        while todo and running < concurrency:
            i, (ids, images) = todo.pop()
            added[str(i)] = time.perf_counter()
            engine.add_request(str(i), ids, params, images=images)
            running += 1
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if engine.stats["prompt_tokens_computed"] > computed:
            prefill_s += now - t0
            computed = engine.stats["prompt_tokens_computed"]
        for out in outs:
            if out.error is not None:
                raise out.error
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now - added[out.request_id]
                prompt_ids[out.request_id] = out.prompt_token_ids
            running -= out.finished
    seconds = time.perf_counter() - start
    after = engine.load_stats()
    delta = {k: after[k] - before[k] for k in COUNTERS}
    image_id = engine.config.image_token_id
    ttft = list(first.values())
    row = {
        "num_prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompt_ids.values()),
        "image_tokens": sum(p.count(image_id) for p in prompt_ids.values()),
        "prompt_tokens_computed": delta["prompt_tokens_computed_total"],
        "prefix_cache_hit_tokens": delta["prefix_cache_hits_total"],
        "prefill_step_s": prefill_s,
        "prompt_tokens_per_s": delta["prompt_tokens_computed_total"] / prefill_s,
        "ttft_s_median": statistics.median(ttft),
        "ttft_s_max": max(ttft),
        "seconds": seconds,
        "output_tokens_per_s": len(prompts) * new_tokens / seconds,
        "images": delta["images_preprocessed_total"],
        "preprocess_s": delta["image_preprocess_seconds_total"],
        "encoder_images": delta["encoder_images_total"],
        "encoder_s": delta["encoder_seconds_total"],
        "encoder_cache_hits": delta["encoder_cache_hits_total"],
    }
    if row["images"]:
        row["preprocess_ms_per_image"] = 1e3 * row["preprocess_s"] / row["images"]
    if row["encoder_images"]:
        row["encoder_ms_per_image"] = 1e3 * row["encoder_s"] / row["encoder_images"]
    return row


def text_twins(engine, lengths: list[int], seed: int) -> list[tuple]:
    """Random text prompts of the given lengths, no images."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, text_vocab(engine), n).tolist(), None) for n in lengths]


def run(
    path,
    images: int,
    sizes: list[str],
    concurrencies: list[int],
    num_prompts: int,
    new_tokens: int,
    dtype: str,
    text: bool = True,
) -> dict:
    """Per (image size, concurrency) a row with the image run and, unless text=False, its
    text twin; one engine (the default LLMEngine) for all of them."""
    from qwen35_ray.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(str(path), dtype=dtype)
    if engine.image_processor is None:
        raise SystemExit(f"{path} has no vision tower; --images needs one")
    compiled = engine.executor.wait_compiled()
    startup = time.perf_counter() - start
    rows, seed = [], 0
    for size in sizes:
        for c in concurrencies:
            # at concurrency 1 fewer prompts keep the run short
            n = num_prompts if c > 1 else max(1, num_prompts // 4)
            progress(f"{images} image(s) of {size} a prompt, concurrency {c}, {n} prompts ...")
            # the same run with other pixels and 2 new tokens first, not counted
            warm = image_prompts(engine, n, images, parse_size(size), seed + 1)
            run_prompts(engine, warm, 2, c)
            prompts = image_prompts(engine, n, images, parse_size(size), seed + 2)
            row = {
                "image_size": size,
                "images_per_prompt": images,
                "concurrency": c,
                "new_tokens": new_tokens,
            }
            row["with_images"] = run_prompts(engine, prompts, new_tokens, c)
            if text:
                per = row["with_images"]["prompt_tokens"] // n
                progress(f"text only, {per} tokens a prompt ...")
                run_prompts(engine, text_twins(engine, [per] * n, seed + 3), 2, c)
                twins = text_twins(engine, [per] * n, seed + 4)
                row["text_only"] = run_prompts(engine, twins, new_tokens, c)
            seed += 4
            rows.append(row)
            print(images_line(row), flush=True)
    engine.shutdown()
    return {"startup_s": startup, "compiled": compiled, "results": rows}


def progress(text: str) -> None:
    print(f"[bench offline] {text}", file=sys.stderr, flush=True)


def images_line(row: dict) -> str:
    r = row["with_images"]
    n = r["num_prompts"]
    text = (
        f"{row['image_size']} x{row['images_per_prompt']}, concurrency {row['concurrency']:>2}: "
        f"{r['prompt_tokens'] // n} prompt tokens ({r['image_tokens'] // n} image), "
        f"prompt {r['prompt_tokens_per_s']:.0f} tok/s, TTFT {1e3 * r['ttft_s_median']:.0f} ms, "
        f"output {r['output_tokens_per_s']:.1f} tok/s; "
        f"encoder {r.get('encoder_ms_per_image', 0):.1f} ms/image, "
        f"preprocess {r.get('preprocess_ms_per_image', 0):.1f} ms/image"
    )
    if "text_only" in row:
        t = row["text_only"]
        text += (
            f" | text only: prompt {t['prompt_tokens_per_s']:.0f} tok/s, "
            f"TTFT {1e3 * t['ttft_s_median']:.0f} ms, output {t['output_tokens_per_s']:.1f} tok/s"
        )
    return text
