"""The ingress over real HTTP refuses what it cannot honour with OpenAI error objects, and
stays healthy: one server (a key from a file, a small body cap) for the whole module."""

import json
import time

import pytest
import requests
from http_helpers import totals
from serve_fixtures import running_app

from qwen35_ray.cli import main as cli

KEY = "sk-from-a-file"
MODEL = "qwen35-tiny"
USER = [{"role": "user", "content": "Hello there"}]
CAP = 64 * 1024


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(tiny)])
    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    args = {
        "model": str(tiny),
        "served_model_name": MODEL,
        "dtype": "float32",
        "api_key_file": str(key_file),
        "max_request_bytes": CAP,
        "engine": {"max_num_seqs": 4, "max_model_len": 1024, "kv_cache_memory_bytes": 2**24},
    }
    with running_app(args) as base:
        yield base


def post(url, path, body=None, key=KEY, content=None, **kw):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body) if content is None else content
    return requests.post(url + path, data=data, headers=headers, timeout=60, **kw)


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status
    assert "Traceback" not in r.text and KEY not in r.text
    return error


def test_the_key_from_the_file_is_required(url):
    error_of(post(url, "/v1/chat/completions", {"model": MODEL, "messages": USER}, key=None), 401)
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": USER}, key="sk-wrong")
    assert error_of(r, 401)["type"] == "authentication_error"
    ok = post(url, "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_nulls_mean_the_defaults(url):
    nulls = dict.fromkeys(
        ["stream", "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
         "stop", "tools", "tool_choice", "stream_options", "response_format", "user", "seed"]
    )  # fmt: skip
    r = post(
        url, "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, **nulls}
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"], r.text
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": None, "n": None})
    assert r.status_code == 200, r.text


def test_starlette_errors_are_openai_errors(url):
    r = requests.get(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    error_of(r, 405)
    error_of(requests.get(url + "/v1/nothing-here", timeout=10), 404)


BAD = [
    (
        "lone surrogate",
        None,
        b'{"model": "qwen35-tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages[0].content",
    ),  # noqa: E501
    ("deep nesting", None, b"[" * 5000 + b"]" * 5000, "nests deeper"),
    (
        "image part",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        },
        None,
        "allowed_media_domains",
    ),  # noqa: E501
    (
        "request template",
        {"messages": USER, "chat_template": "{{ 'x' }}"},
        None,
        "trust_request_chat_template",
    ),  # noqa: E501
    (
        "template in kwargs",
        {"messages": USER, "chat_template_kwargs": {"chat_template": "x"}},
        None,
        "trust_request_chat_template",
    ),  # noqa: E501
    ("seed past int64", {"messages": USER, "seed": 2**64}, None, "seed"),
    (
        "stop_token_ids outside vocab",
        {"messages": USER, "stop_token_ids": [10**9]},
        None,
        "vocabulary",
    ),  # noqa: E501
    ("best_of", {"messages": USER, "best_of": 3}, None, "best_of"),
    (
        "non-integer minLength",
        {
            "messages": USER,
            "tool_choice": "required",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"s": {"type": "string", "minLength": "abc"}},
                            "required": ["s"],
                        },
                    },
                }
            ],
        },
        None,
        "minLength",
    ),  # noqa: E501
]


@pytest.mark.parametrize("name,body,content,says", BAD, ids=[b[0] for b in BAD])
def test_refused_with_a_400_naming_the_problem(url, name, body, content, says):
    if body is not None:
        body = {"model": MODEL, "max_tokens": 4, **body}
    error = error_of(post(url, "/v1/chat/completions", body, content=content), 400)
    assert says in error["message"], error


@pytest.mark.parametrize("body", [{"messages": []}, {"messages": [{"content": "no role"}]}])
def test_tokenize_refuses_malformed_messages(url, body):
    error_of(post(url, "/tokenize", body), 400)


def test_chunked_body_over_the_cap_is_413(url):
    def chunks():
        for _ in range(CAP // 1024 + 4):
            yield b" " * 1024

    error_of(post(url, "/v1/completions", content=chunks()), 413)


def test_completions_with_one_bad_prompt_start_nothing(url):
    before = totals(url)["qwen35_ray_requests_total"]
    body = {"model": MODEL, "prompt": ["Hello", "word " * 1200], "max_tokens": 50}
    assert "context" in error_of(post(url, "/v1/completions", body), 400)["message"]
    after = totals(url)
    assert after["qwen35_ray_requests_total"] == before
    assert after["qwen35_ray:num_requests_running"] == 0


def test_openapi_describes_every_post_body(url):
    spec = requests.get(url + "/openapi.json", timeout=10).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert schema["schema"]["properties"], path
    assert "$defs" not in json.dumps(spec)


def test_still_serves_with_everything_free_after_the_battery(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 4})
    assert r.status_code == 200, r.text
    deadline = time.time() + 20
    while time.time() < deadline:
        m = totals(url)
        free = m["qwen35_ray_state_slots_free"] == m["qwen35_ray_state_slots_total"]
        if m["qwen35_ray:num_requests_running"] == 0 and free:
            return
        time.sleep(0.2)
    pytest.fail(f"work left running: {totals(url)}")
