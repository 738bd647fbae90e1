"""Images over real HTTP with the official `openai` client: the collocated app at /co and the
disaggregated app at /pd (the image prompt prefilled on the prefill pool, its state moved to
the decode pool) on one local Ray cluster, serving the embedded tiny checkpoint (which has a
vision tower). Each answer is checked against the offline engine given the same prompt and
pixels; every bad image is a 400 in OpenAI's format, and nothing is left held after them."""

import base64
import io

import numpy as np
import openai
import pytest
import requests
import transformers
from http_helpers import client, metrics, total
from PIL import Image
from serve_fixtures import running_apps

from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.llm import LLM
from qwen35_ray.model.image_processor import ImageProcessorConfig, preprocess
from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving.builder import build_app, build_pd_app

MODEL = "qwen35-tiny"
MAX_IMAGE_BYTES = 60_000
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


RED = picture(64, 64, 1)
WIDE = picture(96, 48, 2)


@pytest.fixture(scope="module")
def urls():
    common = {
        "model": MODEL,
        "dtype": "float32",
        "engine": {"max_num_seqs": 8, "max_model_len": 2048, "kv_cache_memory_bytes": 2**25},
        "ingress": {"num_cpus": 0.25},
        "media": {"limit_mm_per_prompt": 2, "max_image_bytes": MAX_IMAGE_BYTES},
    }
    co = build_app({**common, "llm_server": {"num_cpus": 0.25}})
    pd = build_pd_app(
        {
            **common,
            "disaggregation": {"min_prefill_tokens": 16},
            "prefill_server": {"num_cpus": 0.25},
            "decode_server": {"num_cpus": 0.25},
        }
    )
    with running_apps({"co": ("/co", co), "pd": ("/pd", pd)}, num_cpus=4) as url:
        yield url + "/co", url + "/pd"


@pytest.fixture(scope="module")
def offline():
    return LLM(model=MODEL, dtype="float32", compile_decode=False)


def rendered(messages: list[dict]) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(MODEL, weights=False))
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def expected(offline, messages, images, max_tokens=8):
    """(output tokens as text pieces, expanded prompt length) of the offline engine."""
    text = rendered(messages)
    # the template writes one pad per image part, in order
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == len(images)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = offline.generate([{"prompt": text, "multi_modal_data": {"image": images}}], params)[0]
    tok = offline.get_tokenizer()
    pieces = [tok.decode([t]) for t in out.outputs[0].token_ids]
    return pieces, len(out.prompt_token_ids)


def ask(base, messages, stream=False, max_tokens=8):
    """(token pieces, prompt tokens) of one greedy chat answer, through the openai client."""
    kw = dict(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        logprobs=True,
        extra_body={"ignore_eos": True, **NO_THINKING},
    )
    c = client(base)
    if not stream:
        r = c.chat.completions.create(**kw)
        return [e.token for e in r.choices[0].logprobs.content], r.usage.prompt_tokens
    pieces, usage = [], None
    for ev in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = ev.usage or usage
        for ch in ev.choices:
            pieces += [e.token for e in ch.logprobs.content] if ch.logprobs else []
    return pieces, usage.prompt_tokens


@pytest.mark.parametrize("app", [0, 1], ids=["collocated", "disaggregated"])
def test_one_image_answers_as_the_offline_engine(urls, offline, app):
    messages = user(image_part(data_uri(RED)), "What is in this picture?")
    want, prompt_len = expected(offline, messages, [RED])
    assert ask(urls[app], messages) == (want, prompt_len)
    assert ask(urls[app], messages, stream=True) == (want, prompt_len)


@pytest.mark.parametrize("app", [0, 1], ids=["collocated", "disaggregated"])
def test_two_images_over_two_turns_and_formats(urls, offline, app):
    # a JPEG decodes to other pixels than the PNG it came from: the offline engine gets
    # what the server decoded
    jpeg = data_uri(WIDE, "JPEG")
    decoded = Image.open(io.BytesIO(base64.b64decode(jpeg.split(",", 1)[1]))).convert("RGB")
    messages = [
        *user(image_part(data_uri(RED)), "Describe it."),
        {"role": "assistant", "content": "A square of noise."},
        *user("And this one?", image_part(jpeg)),
    ]
    want, prompt_len = expected(offline, messages, [RED, decoded])
    assert ask(urls[app], messages) == (want, prompt_len)


def test_tokenize_counts_each_images_tokens(urls, offline):
    messages = user(image_part(data_uri(WIDE)), "Hi")
    r = requests.post(
        urls[0] + "/tokenize", json={"model": MODEL, "messages": messages, **NO_THINKING}
    )
    assert r.status_code == 200, r.text
    _, prompt_len = expected(offline, messages, [WIDE], max_tokens=1)
    assert r.json()["count"] == prompt_len
    cfg = ImageProcessorConfig.from_pretrained(resolve_model(MODEL, weights=False))
    pads = r.json()["tokens"].count(offline.engine.config.image_token_id)
    assert pads == preprocess([WIDE], cfg).tokens[0] > 1


def bad_images():
    big = picture(200, 200, 3)  # random pixels barely compress: a PNG over 60,000 bytes
    text_as_png = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    return {
        "not base64": (user(image_part("data:image/png;base64,@@@@"), "x"), "base64"),
        "not an image": (user(image_part(text_as_png), "x"), "image"),
        "too many bytes": (user(image_part(data_uri(big)), "x"), "max_image_bytes"),
        "a URL not allowed": (
            user(image_part("https://example.com/cat.png"), "x"),
            "allowed_media_domains",
        ),
        "three images": (
            user(*[image_part(data_uri(RED))] * 3, "x"),
            "limit_mm_per_prompt",
        ),
        "a video": (
            user({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, "x"),
            "video",
        ),
        "no url": (user({"type": "image_url", "image_url": {}}, "x"), "image_url"),
        "an image in the system message": (
            [{"role": "system", "content": [image_part(data_uri(RED))]}, *user("x")],
            "ystem",
        ),
    }


@pytest.mark.parametrize("app", [0, 1], ids=["collocated", "disaggregated"])
def test_bad_images_are_400s_and_leave_nothing_held(urls, app):
    base = urls[app]
    for name, (messages, says) in bad_images().items():
        with pytest.raises(openai.BadRequestError) as e:
            client(base).chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        err = e.value.body
        assert e.value.status_code == 400 and err["type"] == "invalid_request_error", name
        assert says in err["message"], (name, err["message"])
        assert "Traceback" not in err["message"], name
    # the server still answers, and its engines hold nothing
    ok = client(base).chat.completions.create(
        model=MODEL, messages=user(image_part(data_uri(RED)), "x"), max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
    found = metrics(base)
    assert total(found, "qwen35_ray:num_requests_running") == 0
    assert total(found, "qwen35_ray:kv_cache_usage_perc") == 0


@pytest.mark.parametrize("app", [0, 1], ids=["collocated", "disaggregated"])
def test_the_responses_api_takes_input_image(urls, app):
    question = "What is in this picture?"
    chat = client(urls[app]).chat.completions.create(
        model=MODEL,
        messages=user(image_part(data_uri(RED)), question),
        temperature=0,
        max_tokens=6,
        extra_body={"ignore_eos": True, **NO_THINKING},
    )
    content = [
        {"type": "input_image", "image_url": data_uri(RED)},
        {"type": "input_text", "text": question},
    ]
    r = client(urls[app]).responses.create(
        model=MODEL,
        input=[{"role": "user", "content": content}],
        temperature=0,
        max_output_tokens=6,
        reasoning={"effort": "none"},
        extra_body={"ignore_eos": True},
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == chat.choices[0].message.content
