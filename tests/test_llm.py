"""The offline LLM API: a request that fails raises its error to the caller."""

import pytest

from qwen35_ray.engine.errors import RequestError, RequestFailed
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("qwen35-tiny", dtype="float32", max_model_len=512, kv_cache_memory_bytes=2**24)


def test_generate_returns_one_output_per_prompt_in_order(llm):
    outs = llm.generate(["Hello", "The sky is"], GREEDY)
    assert [o.prompt for o in outs] == ["Hello", "The sky is"]
    assert all(o.finished and o.error is None and len(o.outputs[0].token_ids) == 5 for o in outs)


def test_a_request_that_fails_raises_and_leaves_the_engine_idle(llm):
    before = llm.generate("Hello", GREEDY)[0].outputs[0].token_ids
    # more top logprobs than the vocabulary holds: sampling this request fails
    many = SamplingParams(logprobs=llm.engine.config.vocab_size + 1, max_tokens=4)
    with pytest.raises(RequestFailed, match="request '\\d+' failed while sampling"):
        llm.generate(["Hello", "Hi"], [GREEDY, many])
    assert not llm.engine.has_unfinished() and llm.engine.cache_manager.is_empty
    assert llm.generate("Hello", GREEDY)[0].outputs[0].token_ids == before


def test_a_request_refused_when_added_aborts_the_ones_added_before(llm):
    too_long = SamplingParams(max_tokens=10_000)
    with pytest.raises(RequestError, match="max_tokens=10000"):
        llm.generate(["Hello", "Hi"], [GREEDY, too_long])
    assert not llm.engine.has_unfinished() and llm.engine.cache_manager.is_empty


def picture(seed: int, size=(64, 48)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_uri(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_renders_the_template_and_takes_images_as_data_uris_or_pil(llm):
    tok = llm.get_tokenizer()
    text = [{"role": "user", "content": "Name three rivers."}]
    rendered = tok.apply_chat_template(text, tokenize=False, add_generation_prompt=True)
    (plain,) = llm.chat(text, GREEDY)
    assert plain.outputs[0].token_ids == llm.generate(rendered, GREEDY)[0].outputs[0].token_ids

    a, b = picture(1), picture(2, (96, 64))

    def asking(*images):
        return [{"role": "user", "content": [*images, {"type": "text", "text": "Compare."}]}]

    by_uri = asking(*({"type": "image_url", "image_url": {"url": png_uri(x)}} for x in (a, b)))
    by_pil = asking({"type": "image_pil", "image_pil": a}, {"type": "image", "image": b})
    both = llm.chat([by_uri, by_pil], GREEDY)
    prompt = tok.apply_chat_template(
        asking({"type": "image"}, {"type": "image"}), tokenize=False, add_generation_prompt=True
    )
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    (want,) = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": [a, b]}}], GREEDY)
    assert both[0].outputs[0].token_ids == both[1].outputs[0].token_ids
    assert both[0].outputs[0].token_ids == want.outputs[0].token_ids
    # the images' tokens are in the prompt: far more than one pad each
    assert len(both[0].prompt_token_ids) == len(want.prompt_token_ids) > len(tok(prompt).input_ids)


@pytest.mark.parametrize(
    "part, says",
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "allowed"),
        ({"type": "video_url", "video_url": {"url": "x"}}, "no video"),
    ],
)
def test_chat_refuses_what_it_cannot_read(llm, part, says):
    with pytest.raises(ValueError, match=says):
        llm.chat([{"role": "user", "content": [part]}], GREEDY)
    assert not llm.engine.has_unfinished()


MTP2 = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.mark.parametrize("name", ["speculative", "speculative_config"])
def test_speculative_and_vllms_speculative_config_reach_the_engine_as_speculative(
    name, monkeypatch
):
    import qwen35_ray.llm as llm_module

    built = {}
    monkeypatch.setattr(llm_module, "build_engine", lambda *a, **kw: built.update(kw))
    LLM("qwen35-tiny", max_model_len=256, **{name: MTP2})
    assert built["speculative"] == MTP2 and "speculative_config" not in built
    assert built["max_model_len"] == 256


def test_speculative_given_under_both_names_is_refused():
    with pytest.raises(ValueError, match="speculative and speculative_config are one setting"):
        LLM("qwen35-tiny", speculative=MTP2, speculative_config=MTP2)


def test_speculative_with_expert_parallelism_is_refused_before_ray_starts(monkeypatch):
    import qwen35_ray.distributed.build as build

    def no_ray(ep):
        raise AssertionError("Ray was started for a configuration that cannot run")

    monkeypatch.setattr(build, "ensure_ray", no_ray)
    with pytest.raises(ValueError, match="speculative .*expert_parallel_size=2") as e:
        LLM("qwen35-tiny", expert_parallel_size=2, speculative_config=MTP2)
    assert "experts are not sharded across ranks" in str(e.value)
