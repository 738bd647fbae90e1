"""Images through the engine: greedy tokens equal transformers' Qwen3_5(Moe)ForConditionalGeneration
on random checkpoints with a vision tower, for prompts with 0, 1 and 3 images, batched with text,
with chunked prefill splitting an image's tokens, through prefix caching and a RequestState move."""

import asyncio
import json

import pytest
import torch
import transformers
from engine_fixtures import checkpoint, make_engine, prompt, tiny_tokenizer
from hf_reference import MOE, TEXT, VISION, randomize
from PIL import Image

from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.cache_sizing import resolve_max_model_len, size_cache
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.cuda_graph import build
from qwen35_ray.engine.errors import RequestError
from qwen35_ray.engine.executor import InProcessExecutor
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.llm import LLM
from qwen35_ray.model.image_processor import (
    QWEN35_PREPROCESSOR,
    ImageProcessorConfig,
    preprocess,
)
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.tiny.tokenizer import write_tokenizer
from qwen35_ray.model.vision import load_vision

# special tokens inside the 300-token vocabulary; prompt text stays below them
VIDEO, START, IMAGE, END = 295, 296, 297, 298
TEXT_VOCAB = 290
# images of 4 to 15 tokens: 64 x 64 pixels is the smallest
PROCESSOR = {**QWEN35_PREPROCESSOR, "size": {"shortest_edge": 4096, "longest_edge": 40960}}
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True}  # fmt: skip
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def vl_model(kind: str):
    ids = dict(
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END,
    )  # fmt: skip
    if kind == "qwen3_5_moe":
        config = transformers.Qwen3_5MoeConfig(
            text_config={**TEXT, **MOE, "rope_parameters": ROPE}, vision_config=VISION, **ids
        )
        cls = transformers.Qwen3_5MoeForConditionalGeneration
    else:
        config = transformers.Qwen3_5Config(
            text_config={**TEXT, "intermediate_size": 96, "rope_parameters": ROPE},
            vision_config=VISION,
            **ids,
        )
        cls = transformers.Qwen3_5ForConditionalGeneration
    torch.manual_seed(42)
    model = cls(config).float().eval()
    randomize(model)
    return model


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_5"])
def setup(request, tmp_path_factory):
    ref = vl_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    # any tokenizer will do (token-id prompts); LLM(model=path) loads one from the directory
    write_tokenizer(path)
    return ref, path, transformers.AutoTokenizer.from_pretrained(path)


def image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def with_images(text: list[int], images: list, at: list[int]) -> list[int]:
    """text with <|vision_start|><|image_pad|><|vision_end|> for each image before text[at]."""
    out, last = [], 0
    for cut in at:
        out += text[last:cut] + [START, IMAGE, END]
        last = cut
    return out + text[last:]


def expanded(ids: list[int], images: list) -> list[int]:
    """ids with each <|image_pad|> repeated to its image's tokens, as transformers takes them."""
    tokens = iter(preprocess(images, ImageProcessorConfig.from_dict(PROCESSOR)).tokens)
    return [t for i in ids for t in ([i] * next(tokens) if i == IMAGE else [i])]


@torch.no_grad()
def hf_greedy(ref, ids: list[int], images: list, n: int) -> list[int]:
    """transformers' greedy tokens, each from a full uncached forward over the prefix (see
    engine_fixtures.hf_greedy), with the images' pixels."""
    out = expanded(ids, images)
    kw = {}
    if images:
        inputs = preprocess(images, ImageProcessorConfig.from_dict(PROCESSOR))
        kw = dict(pixel_values=inputs.pixel_values, image_grid_thw=inputs.grid_thw)
    start = len(out)
    for _ in range(n):
        ids = torch.tensor([out])
        if images:
            kw["mm_token_type_ids"] = (ids == IMAGE).int()
        logits = ref(input_ids=ids, **kw).logits
        out.append(int(logits[0, -1].argmax()))
    return out[start:]


IMAGES = [image(64, 64, 1), image(128, 96, 2), image(96, 160, 3)]
REQUESTS = {
    "text": (prompt(23, 10, TEXT_VOCAB), []),
    "one": (with_images(prompt(12, 11, TEXT_VOCAB), IMAGES[1:2], [5]), IMAGES[1:2]),
    "three": (with_images(prompt(20, 12, TEXT_VOCAB), IMAGES, [0, 7, 15]), IMAGES),
    "last": (with_images(prompt(9, 13, TEXT_VOCAB), IMAGES[2:], [9]), IMAGES[2:]),
}


def generate(engine, requests, params=GREEDY):
    for rid, (ids, images) in requests.items():
        engine.add_request(rid, ids, params, images=images or None)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


@pytest.fixture(scope="module")
def expected(setup):
    ref, _, _ = setup
    return {
        rid: hf_greedy(ref, ids, imgs, GREEDY.max_tokens) for rid, (ids, imgs) in REQUESTS.items()
    }


@pytest.mark.parametrize("budget", [2048, 7], ids=["whole", "chunked"])
def test_images_batched_with_text_give_transformers_tokens(setup, expected, budget):
    _, path, tok = setup
    engine = make_engine(path, tok, max_num_batched_tokens=budget, compile_decode=False,
                         enable_prefix_caching=False)  # fmt: skip
    assert generate(engine, REQUESTS) == expected


def test_the_same_image_hits_the_prefix_cache_and_a_different_one_does_not(setup):
    ref, path, tok = setup
    engine = make_engine(path, tok, block_size=4, compile_decode=False)
    text = prompt(12, 20, TEXT_VOCAB)
    ids = with_images(text, IMAGES[1:2], [3])
    same = image(128, 96, 2)  # equal pixels, another object
    other = image(128, 96, 99)  # the same size: the same pad tokens
    runs = {}
    for rid, img in (("first", IMAGES[1]), ("same", same), ("other", other)):
        before = engine.load_stats()["prefix_cache_hits_total"]
        runs[rid] = generate(engine, {rid: (ids, [img])})[rid]
        runs[rid + "_hits"] = engine.load_stats()["prefix_cache_hits_total"] - before
    assert runs["first_hits"] == 0
    # every whole block before the prompt's last token comes from the cache
    assert runs["same_hits"] == (len(expanded(ids, [IMAGES[1]])) - 1) // 4 * 4
    assert runs["other_hits"] == 0
    assert runs["same"] == runs["first"] == hf_greedy(ref, ids, [IMAGES[1]], GREEDY.max_tokens)
    assert runs["other"] == hf_greedy(ref, ids, [other], GREEDY.max_tokens)


def test_a_prefilled_image_request_moves_with_its_rope_delta(setup, expected):
    # decode right after the image: on these random weights "one" and "three" keep their
    # six tokens even at a wrong delta, "last" does not (checked by dropping it at import)
    rid = "last"
    _, path, tok = setup
    here = make_engine(path, tok, compile_decode=False, enable_prefix_caching=False)
    there = make_engine(path, tok, compile_decode=False, enable_prefix_caching=False)
    ids, images = REQUESTS[rid]
    here.add_request("moved", ids, GREEDY, prefill_only=True, images=images)
    state = None
    while state is None:
        for out in here.step():
            state = out.request_state
    state = RequestState.from_bytes(state.to_bytes())
    assert state.rope_delta < 0  # an image advances the positions less than its tokens
    there.import_request(state)
    tokens = None
    while there.has_unfinished():
        for out in there.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    assert tokens == expected[rid]


def test_llm_generate_takes_images_as_multi_modal_data(setup, expected):
    _, path, _ = setup
    llm = LLM(model=str(path), dtype="float32", compile_decode=False)
    prompts = [
        {"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else
        {"prompt_token_ids": ids}
        for ids, images in (REQUESTS["one"], REQUESTS["text"])
    ]  # fmt: skip
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [expected["one"], expected["text"]]
    # the prompt the engine ran holds the image's pad tokens
    assert outs[0].prompt_token_ids == expanded(*REQUESTS["one"])


def test_a_prompt_whose_pads_do_not_match_its_images_is_refused(setup):
    _, path, tok = setup
    engine = make_engine(path, tok, compile_decode=False)
    ids, images = REQUESTS["three"]
    with pytest.raises(RequestError, match="3 <\\|image_pad\\|> tokens for 2 images"):
        engine.add_request("bad", ids, GREEDY, images=images[:2])
    assert not engine.has_unfinished()


def test_a_failing_vision_tower_fails_its_request_alone(setup, expected):
    _, path, tok = setup
    engine = make_engine(path, tok, compile_decode=False, enable_prefix_caching=False)

    def broken(pixel_values, grid_thw):
        raise RuntimeError("out of memory")

    engine.executor.encode_images = broken
    ids, images = REQUESTS["one"]
    engine.add_request("image", ids, GREEDY, images=images)
    engine.add_request("text", REQUESTS["text"][0], GREEDY)
    errors, done = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            elif out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert list(errors) == ["image"]
    assert done == {"text": expected["text"]}
    assert engine.cache_manager.slots.num_free == engine.cache_manager.slots.size


def graphed_engine(path, tok, device: str, capture: bool, **kw):
    """An engine whose decode steps go through DecodeGraphs (engine/cuda_graph.py); on CPU
    with capture=False their function runs eagerly on the static buffers."""
    dtype = torch.float32
    ec = EngineConfig(compile_decode=False, enable_prefix_caching=False, **kw)
    model, config, _ = load_model(path, dtype=dtype, device=device, progress=False)
    max_len = resolve_max_model_len(config, ec)
    size = size_cache(config, ec, dtype, max_len)
    cache, graphs = build(model, config, size, ec.block_size, max_len, dtype, device, capture)
    vision = load_vision(path, dtype=dtype, device=device)
    executor = InProcessExecutor(model, config, cache, device, graphs=graphs, vision=vision)
    engine = LLMEngine(model, config, tok, ec, path, device, executor=executor, dtype=dtype,
                       fingerprint="graphed")  # fmt: skip
    return engine, graphs


def test_decode_graphs_carry_each_sequences_rope_delta(setup, expected):
    """The graphs' static buffer holds index + delta per row: padded decode batches mixing
    text and image requests give transformers' tokens."""
    _, path, tok = setup
    engine, graphs = graphed_engine(path, tok, "cpu", capture=False, max_num_seqs=6)
    assert generate(engine, REQUESTS) == expected
    assert sum(graphs.steps.values()) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_with_images_give_transformers_tokens(setup, expected):
    _, path, tok = setup
    engine, graphs = graphed_engine(path, tok, "cuda", capture=True, max_num_seqs=6)
    assert graphs.captured
    assert generate(engine, REQUESTS) == expected


def test_compiled_decode_continues_at_each_sequences_rope_delta(setup, expected):
    """The compiled decode step (CPU, engine/decode_graph.py) takes index + delta as its
    rotary positions."""
    _, path, tok = setup
    engine = make_engine(path, tok, compile_decode=True, enable_prefix_caching=False)
    assert generate(engine, REQUESTS) == expected
    assert sum(engine.executor.runner.compiled_decode.steps) > 0


def test_a_one_token_chunk_of_an_image_is_not_run_as_a_decode(setup):
    """A prompt ending in its image's pads, split so that the last chunk is one pad token on
    top of cached ones (what the decode paths take): it still gets its image embedding and
    its (t, h, w) position."""
    ref, path, tok = setup
    ids = prompt(5, 30, TEXT_VOCAB) + [START, IMAGE]
    assert len(expanded(ids, IMAGES[:1])) % 3 == 1
    engine = make_engine(path, tok, max_num_batched_tokens=3, compile_decode=False)
    got = generate(engine, {"tail": (ids, IMAGES[:1])})["tail"]
    assert got == hf_greedy(ref, ids, IMAGES[:1], GREEDY.max_tokens)


def test_async_engine_streams_image_requests(setup, expected):
    _, path, tok = setup
    engine = AsyncEngine(make_engine(path, tok, compile_decode=False))

    async def one(rid):
        ids, images = REQUESTS[rid]
        async for out in engine.generate(rid, ids, GREEDY, images=images or None):
            last = out
        return rid, last.outputs[0].token_ids

    async def main():
        return dict(await asyncio.gather(*(one(r) for r in ("three", "text"))))

    assert asyncio.run(main()) == {r: expected[r] for r in ("three", "text")}
    assert engine.engine.cache_manager.is_empty


def test_resent_images_are_not_encoded_again(setup, expected):
    """The second request sends two of the first one's three images and a new one: the
    tower runs over the new one only, and the tokens are transformers'."""
    ref, path, tok = setup
    engine = make_engine(path, tok, compile_decode=False, enable_prefix_caching=False)
    encoded = []
    tower = engine.executor.encode_images

    def counting(pixel_values, grid_thw):
        encoded.append(grid_thw.tolist())
        return tower(pixel_values, grid_thw)

    engine.executor.encode_images = counting
    assert generate(engine, {"three": REQUESTS["three"]}) == {"three": expected["three"]}
    new = image(64, 96, 7)
    images = [IMAGES[2], new, IMAGES[0]]
    ids = with_images(prompt(10, 40, TEXT_VOCAB), images, [2, 4, 8])
    got = generate(engine, {"again": (ids, images)})["again"]
    assert got == hf_greedy(ref, ids, images, GREEDY.max_tokens)
    grid = preprocess([new], ImageProcessorConfig.from_dict(PROCESSOR)).grid_thw.tolist()
    assert encoded[1:] == [grid]
    assert (engine.encoder_cache.hits, engine.encoder_cache.misses) == (2, 4)
    # load_stats: every image prepared at admission, the 4 the tower ran on, the 2 it did not
    stats = engine.load_stats()
    assert (stats["images_preprocessed_total"], stats["encoder_images_total"]) == (6, 4)
    assert stats["encoder_cache_hits_total"] == 2
    assert stats["encoder_seconds_total"] > 0 and stats["image_preprocess_seconds_total"] > 0


def test_an_encoder_cache_of_zero_bytes_keeps_nothing(setup, expected):
    _, path, tok = setup
    engine = make_engine(path, tok, compile_decode=False, encoder_cache_bytes=0)
    for rid in ("three", "one"):
        assert generate(engine, {rid: REQUESTS[rid]}) == {rid: expected[rid]}
    assert engine.encoder_cache.hits == 0 and not engine.encoder_cache.entries


def test_a_prefix_cache_hit_that_ends_inside_an_image(setup):
    """The first prompt ends in its image's pads, so its cached prefix ends inside the image;
    the second continues that prompt and resumes the image's embeddings and positions from
    there."""
    ref, path, tok = setup
    engine = make_engine(path, tok, block_size=4, compile_decode=False)
    first = prompt(3, 50, TEXT_VOCAB) + [START, IMAGE]
    second = first + [END] + prompt(5, 51, TEXT_VOCAB)
    img = IMAGES[1:2]
    generate(engine, {"first": (first, img)})
    before = engine.load_stats()["prefix_cache_hits_total"]
    got = generate(engine, {"second": (second, img)})["second"]
    hits = engine.load_stats()["prefix_cache_hits_total"] - before
    start = len(prompt(3, 50, TEXT_VOCAB)) + 1
    assert start < hits < start + 12  # inside the image's 12 pads
    assert got == hf_greedy(ref, second, img, GREEDY.max_tokens)


def test_an_engine_without_a_vision_tower_refuses_images(tmp_path_factory):
    _, path = checkpoint("qwen3_5", tmp_path_factory)  # a text-only checkpoint
    engine = make_engine(path, tiny_tokenizer(tmp_path_factory), compile_decode=False)
    with pytest.raises(RequestError, match="takes no images"):
        engine.add_request("x", [1, START, IMAGE, END], GREEDY, images=IMAGES[:1])
    assert not engine.has_unfinished()


def test_images_are_prepared_off_the_step_thread(setup, expected):
    # AsyncEngine resizes and patches a request's images in a worker thread: the step thread
    # only sees the prepared PromptImages (a large image does not stall running decodes)
    import threading

    _, path, tok = setup
    engine = AsyncEngine(make_engine(path, tok, compile_decode=False))
    threads = []
    prepare = engine.engine.prepare_images

    def spy(ids, images):
        threads.append(threading.current_thread().name)
        return prepare(ids, images)

    engine.engine.prepare_images = spy
    ids, images = REQUESTS["one"]

    async def main():
        async for out in engine.generate("one", ids, GREEDY, images=images):
            last = out
        return last

    last = asyncio.run(main())
    assert last.outputs[0].token_ids == expected["one"]
    assert threads and "engine-step" not in threads[0] and threads[0] != "MainThread"
    # the output's prompt is the expanded one the engine computed
    assert len(last.prompt_token_ids) > len(ids)
