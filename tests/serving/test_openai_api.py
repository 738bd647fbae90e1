"""The OpenAI API over real HTTP on a local Ray cluster, driven by the official `openai` client."""

import json

import openai
import pytest
import requests
from http_helpers import totals
from serve_fixtures import running_app

from qwen35_ray.cli import main as cli

KEY = "sk-test"
MODEL = "qwen35-tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(tiny)])
    args = {
        "model": str(tiny),
        "served_model_name": MODEL,
        "dtype": "float32",
        "api_key": KEY,
        "engine": {"max_num_seqs": 8, "max_model_len": 512, "kv_cache_memory_bytes": 2**24},
    }
    with running_app(args) as url:
        yield url, tiny


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]
FIXED = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_models_list(client):
    (model,) = client.models.list().data
    assert model.id == MODEL


def test_chat_non_streaming_and_streaming_agree(client):
    full = client.chat.completions.create(model=MODEL, messages=USER, **FIXED)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 10
    whole = (getattr(choice.message, "reasoning_content", None) or "") + (
        choice.message.content or ""
    )
    parts, reasons, usage = [], [], None
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}, **FIXED
    )
    for ev in stream:
        if ev.usage:
            usage = ev.usage
        for c in ev.choices:
            d = c.delta
            parts.append((getattr(d, "reasoning_content", None) or "") + (d.content or ""))
            reasons.append(c.finish_reason)
    assert "".join(parts) == whole
    assert reasons[-1] == "length" and usage.completion_tokens == 12


def test_thinking_on_by_default_and_off_on_request(client):
    on = client.chat.completions.create(model=MODEL, messages=USER, **FIXED).choices[0].message
    assert getattr(on, "reasoning_content", None)  # the prompt opened <think>
    off = (
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=0,
            max_tokens=12,
            extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
        )
        .choices[0]
        .message
    )
    assert getattr(off, "reasoning_content", None) is None and off.content


def post(server, path: str, body: dict) -> dict:
    """The non-/v1 routes (vLLM keeps /tokenize and /detokenize at the root)."""
    r = requests.post(
        server[0] + path, json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_text_and_token_ids(client, server):
    a = client.completions.create(model=MODEL, prompt="Once upon a time", **FIXED)
    ids = post(server, "/tokenize", {"prompt": "Once upon a time"})["tokens"]
    b = client.completions.create(model=MODEL, prompt=ids, **FIXED)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 12


def test_n_logprobs_and_seed(client):
    request = dict(
        model=MODEL,
        prompt="Hello",
        n=2,
        temperature=1.0,
        max_tokens=8,
        seed=11,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**request)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.token_logprobs) == 8
        assert all(len(top) <= 3 for top in c.logprobs.top_logprobs)
    again = client.completions.create(**request)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, logprobs=True, top_logprobs=3, **FIXED
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 3 for t in content)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def test_conversation_with_tools_calls_and_results(client, server):
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", **FIXED
    )
    assert r.choices[0].finish_reason in ("length", "tool_calls")
    ids = post(server, "/tokenize", {"messages": messages})["tokens"]
    text = post(server, "/detokenize", {"tokens": ids})["prompt"]
    assert "<tool_response>" in text and "<function=get_weather>" in text


def test_greedy_over_http_equals_the_offline_engine(client, server):
    from qwen35_ray import LLM, SamplingParams

    ids = post(server, "/tokenize", {"prompt": "The quick brown fox"})["tokens"]
    http = (
        client.completions.create(
            model=MODEL, prompt=ids, temperature=0, max_tokens=16, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    llm = LLM(str(server[1]), dtype="float32", max_model_len=512)
    offline = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    )
    assert http == offline[0].outputs[0].text


def raw(server, path, body, key=KEY, content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is None:
        content = json.dumps(body)
    return requests.post(
        server[0] + path,
        data=content,
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )


BAD = [
    ("invalid json", None, "{not json", 400),
    ("not an object", None, "[1, 2]", 400),
    ("missing messages", {"model": MODEL}, None, 400),
    ("messages wrong type", {"model": MODEL, "messages": "hi"}, None, 400),
    ("unknown model", {"model": "gpt-9", "messages": USER}, None, 404),
    (
        "prompt too long",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]},
        None,
        400,
    ),
    ("max_tokens too large", {"model": MODEL, "messages": USER, "max_tokens": 100000}, None, 400),
    ("max_tokens zero", {"model": MODEL, "messages": USER, "max_tokens": 0}, None, 400),
    ("max_tokens negative", {"model": MODEL, "messages": USER, "max_tokens": -5}, None, 400),
    ("temperature out of range", {"model": MODEL, "messages": USER, "temperature": 7}, None, 400),
    ("top_p out of range", {"model": MODEL, "messages": USER, "top_p": 1.5}, None, 400),
    ("n zero", {"model": MODEL, "messages": USER, "n": 0}, None, 400),
    (
        "top_logprobs too large",
        {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 50},
        None,
        400,
    ),
    (
        "tool_choice absent tool",
        {
            "model": MODEL,
            "messages": USER,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        None,
        400,
    ),
    (
        "bad role order",
        {"model": MODEL, "messages": [USER[0], {"role": "system", "content": "late"}]},
        None,
        400,
    ),
]


@pytest.mark.parametrize("name,body,content,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_an_error_object(server, name, body, content, status):
    r = raw(server, "/v1/chat/completions", body, content=content)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in r.text


def test_api_key_is_required(server):
    assert (
        raw(
            server, "/v1/chat/completions", {"model": MODEL, "messages": USER}, key=None
        ).status_code
        == 401
    )
    r = raw(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_oversized_body_is_413(server):
    r = raw(
        server,
        "/v1/completions",
        None,
        # over the default max_request_bytes (16 MiB)
        content=json.dumps({"model": MODEL, "prompt": "x" * (17 * 2**20)}),
    )
    assert r.status_code == 413 and r.json()["error"]


def test_server_keeps_serving_after_the_battery(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, **FIXED)
    assert r.choices[0].finish_reason == "length"


def metrics(server) -> dict:
    return totals(server[0])


def test_client_disconnect_aborts_and_frees(server):
    import time

    before = metrics(server)["qwen35_ray_requests_aborted_total"]
    body = {"model": MODEL, "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with requests.post(
        server[0] + "/v1/chat/completions",
        json=body,
        stream=True,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.time() + 30
    while time.time() < deadline:
        m = metrics(server)
        if (
            m["qwen35_ray_requests_aborted_total"] > before
            and m["qwen35_ray:num_requests_running"] == 0
            and m["qwen35_ray_state_slots_free"] == m["qwen35_ray_state_slots_total"]
            and m["qwen35_ray_kv_blocks_free"] == m["qwen35_ray_kv_blocks_total"]
        ):
            return
        time.sleep(0.2)
    pytest.fail(f"request not aborted after the client left: {metrics(server)}")
