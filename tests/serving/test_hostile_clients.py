"""One collocated app at its default settings against hostile and careless clients: the cases
reported in issue 15, a fuzzer over /openapi.json, a burst of 200 streams and a storm of
disconnects. Afterwards the same replica answers a greedy request with the same tokens as
before, and /metrics shows nothing running and every slot and block free.

The tests run in file order and share the server; the last one checks what the others left.
"""

import asyncio
import json
import re
import socket
import time

import jsonschema
import openai
import pytest
import requests
from http_helpers import totals
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from json_schemas import WEATHER_ARGS
from schema_strategy import JSON, from_schema
from serve_fixtures import running_app

from qwen35_ray.cli import main as cli

# slow tier (.ci/run): a fuzzing run, a 200-stream burst and a leak check after them
pytestmark = pytest.mark.slow

MODEL = "qwen35-tiny"
JSON_HEADERS = {"Content-Type": "application/json"}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(tiny)])
    # defaults everywhere else: dtype, engine sizes, queues, replicas
    with running_app({"model": str(tiny), "served_model_name": MODEL}) as url:
        yield url


@pytest.fixture(scope="module")
def greedy_before(server):
    return greedy(server), engine_replicas()


def engine_replicas() -> list[str]:
    """The live LLMServer replica actors (this test process is the Ray driver)."""
    import ray

    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in actors if "#LLMServer#" in a["name"])


def greedy(url: str) -> list[int]:
    body = {"model": MODEL, "prompt": "The capital of France", "max_tokens": 12, "temperature": 0}
    body |= {"logprobs": 0, "ignore_eos": True}
    r = requests.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def is_error_object(r: requests.Response) -> bool:
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and error.get("code") == r.status_code


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4} | extra


def forced_tool(parameters: dict) -> dict:
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    return chat(tools=[tool], tool_choice="required", max_tokens=64)


# (route, JSON body or raw bytes, expected status); the cases, and a few more
CASES = [
    ("/v1/chat/completions", chat(seed=2**64), 400),
    ("/v1/chat/completions", chat(seed=-(2**63) - 1), 400),
    ("/v1/chat/completions", chat(n=2, seed=2**64 - 1), 400),
    ("/v1/chat/completions", chat(n=2, seed=2**63 - 1, temperature=1), 200),
    ("/v1/chat/completions", chat(temperature=1e-300), 200),
    ("/v1/chat/completions", chat(repetition_penalty=1e-300), 400),
    ("/v1/chat/completions", chat(repetition_penalty=1e300), 400),
    (
        "/v1/chat/completions",
        chat(chat_template_kwargs={"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}),
        400,
    ),
    ("/v1/chat/completions", chat(chat_template="{{ messages }}"), 400),
    (
        "/v1/chat/completions",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}},
                    ],
                }
            ]
        ),
        400,
    ),
    (
        "/v1/chat/completions",
        b'{"model": "qwen35-tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
    ),
    ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, 400),
    ("/v1/chat/completions", b'{"model": "qwen35-tiny", "messages": ' + b"[" * 5000, 400),
    ("/v1/chat/completions", b"not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/tokenize", {"messages": []}, 400),
    ("/tokenize", {"messages": [{"role": 1}]}, 400),
    ("/tokenize", {"messages": [1, 2]}, 400),
    ("/tokenize", {"messages": [{"role": "user", "content": {"a": 1}}]}, 400),
    (
        "/v1/chat/completions",
        forced_tool({"type": "object", "properties": {"a": {"type": "string", "minLength": 1.5}}}),
        400,
    ),
    (
        "/v1/chat/completions",
        forced_tool(
            {
                "type": "object",
                "properties": {"a": {"type": "string", "maxLength": 10**9}},
                "required": ["a"],
            }
        ),
        400,
    ),
    (
        "/v1/chat/completions",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 10**9}},
            }
        ),
        400,
    ),
    ("/v1/chat/completions", chat(stop=["x"] * 10_000), 400),
    ("/v1/chat/completions", chat(stop=["x" * 100_000]), 400),
    ("/v1/chat/completions", chat(stop_token_ids=list(range(100_000))), 400),
    ("/v1/chat/completions", chat(stop_token_ids=[10**12]), 400),
    ("/v1/chat/completions", chat(logit_bias={"999999999": 5}), 400),
    ("/v1/chat/completions", chat(logit_bias={"5": 1000}), 400),
    ("/v1/chat/completions", chat(logit_bias={"5": -100, "6": 100}), 200),
    ("/v1/chat/completions", chat(max_tokens=10**12), 400),
    ("/v1/chat/completions", chat(top_logprobs=10**6, logprobs=True), 400),
    ("/v1/chat/completions", chat(best_of=5), 400),
    ("/v1/chat/completions", chat(messages=USER * 3000), 400),
    (
        "/v1/chat/completions",
        chat(stream=None, n=None, presence_penalty=None, frequency_penalty=None, logprobs=None),
        200,
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": None, "max_tokens": 2}, 200),
    ("/v1/completions", {"model": MODEL, "prompt": ["Hi", [10**12]], "max_tokens": 2}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ["Hi", "x"], "max_tokens": 10**9}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [[5]] * 100_000, "max_tokens": 1}, 400),
    ("/v1/nope", {}, 404),
]


@pytest.mark.parametrize("route,body,status", CASES, ids=range(len(CASES)))
def test_reported_case(server, greedy_before, route, body, status):
    if isinstance(body, bytes):
        r = requests.post(server + route, data=body, timeout=60)
    else:
        r = requests.post(server + route, json=body, timeout=60)
    assert r.status_code == status, r.text[:500]
    if status >= 400:
        assert is_error_object(r), r.text[:500]
        assert "Traceback" not in r.text


def test_wrong_methods_are_error_objects(server):
    for method, route in (("GET", "/v1/chat/completions"), ("DELETE", "/v1/models")):
        r = requests.request(method, server + route, timeout=30)
        assert r.status_code == 405 and is_error_object(r), r.text


def test_a_chunked_body_over_the_cap_is_refused(server):
    def chunks():
        for _ in range(192):
            yield b" " * 2**17  # 24 MiB in all, over the default 16 MiB cap

    r = requests.post(server + "/v1/chat/completions", data=chunks(), timeout=60)
    assert r.status_code == 413 and is_error_object(r)


def _request_bodies(url: str) -> dict[str, dict]:
    spec = requests.get(url + "/openapi.json", timeout=30).json()
    out = {}
    for path, methods in spec["paths"].items():
        body = methods.get("post", {}).get("requestBody")
        if body:
            schema = body["content"]["application/json"]["schema"]
            out[path] = schema
    return out


def _bounded(body):
    """Keep generation short: the fuzzer tests what the server accepts, not how long it talks."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            # an explicit null means "the rest of the context", as absent does
            if key in body and (body[key] is None or isinstance(body[key], int) and body[key] > 4):
                body[key] = 4
        body.setdefault("max_tokens", 4)
        # /v1/responses' name for it; the other routes ignore the field
        body.setdefault("max_output_tokens", 4)
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return body


def _completion_texts(url: str, stream: bool, **body) -> list[str]:
    body = {"model": MODEL, "prompt": "Tell me a story", "n": 2, "seed": 7} | body
    body |= {"temperature": 1.0, "max_tokens": 24, "ignore_eos": True, "stream": stream}
    r = requests.post(url + "/v1/completions", json=body, timeout=60, stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    texts = ["", ""]
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] += c["text"]
    return texts


def test_stop_strings_across_token_boundaries_streamed_or_not(server):
    """Stops that start and end inside tokens: both outputs of n=2 end exactly before the
    stop, streamed and not, and the streamed deltas never showed its first characters."""
    full = _completion_texts(server, stream=False)
    assert full == _completion_texts(server, stream=True)
    for stop in (full[0][2:4], full[0][5:9], full[1][3:6]):
        expected = [t[: t.index(stop)] if stop in t else t for t in full]
        assert _completion_texts(server, stream=False, stop=[stop]) == expected, stop
        assert _completion_texts(server, stream=True, stop=[stop]) == expected, stop


def test_a_forced_tool_call_with_a_thinking_budget_comes_within_max_tokens(server):
    """Thinking on (the template's default): after 32 tokens the engine closes </think>, so
    the forced call is written and validates, on the random tiny model."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}}
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[tool],
            tool_choice="required",
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            extra_body={"thinking_token_budget": 32},
        )
        (call,) = out.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
        assert out.usage.completion_tokens <= 200


def test_fuzzed_bodies_never_get_a_5xx(server, greedy_before):
    """1,000 bodies in all: by each route's schema in /openapi.json, and schema-valid bodies
    with one field replaced by arbitrary JSON."""
    schemas = _request_bodies(server)
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize"} <= set(schemas)
    session = requests.Session()
    failures = []
    per_route = 1000 // len(schemas) + 1

    def fuzz(path: str, schema: dict):
        @settings(
            max_examples=per_route,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(body=from_schema(schema), key=st.text(max_size=12), junk=JSON, mutate=st.booleans())
        def one(body, key, junk, mutate):
            if isinstance(body, dict) and path.startswith("/v1"):
                body["model"] = MODEL  # past the 404, so bodies reach validation and engine
            if mutate and isinstance(body, dict) and body:
                body[sorted(body)[sum(map(ord, key)) % len(body)]] = junk
            # json.dumps writes NaN and Infinity, which the server must refuse, not crash on
            data = json.dumps(_bounded(body)).encode()
            r = session.post(server + path, data=data, headers=JSON_HEADERS, timeout=60)
            sent.append(path)
            if r.status_code >= 500 or (r.status_code >= 400 and not is_error_object(r)):
                failures.append((path, body, r.status_code, r.text[:300]))

        one()

    sent = []
    for path, schema in schemas.items():
        fuzz(path, schema)
    assert len(sent) >= 1000
    assert not failures, failures[:5]


def test_a_burst_of_200_streams_gets_answers_or_fast_503s(server):
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(i):
        t0 = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Count to {i}"}],
                max_tokens=32,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            reason = None
            async for ev in stream:
                for c in ev.choices:
                    reason = c.finish_reason or reason
            return reason, time.perf_counter() - t0
        except openai.APIStatusError as e:
            return e.status_code, time.perf_counter() - t0

    async def burst():
        return await asyncio.gather(*(asyncio.wait_for(one(i), 120) for i in range(200)))

    results = asyncio.run(burst())
    outcomes = [r for r, _ in results]
    slowest = max(t for _, t in results)
    print(
        f"burst: {outcomes.count('length')} complete, {outcomes.count(503)} 503s, {slowest:.1f} s"
    )
    assert set(outcomes) <= {"length", 503}, outcomes
    assert outcomes.count("length") >= 32  # a full batch at least was served
    # the refused are refused at once; the admitted finish within the clients' 120 s (else
    # wait_for raises), at the engine's pace: under 30 s on one 2-core host, 53-59 s on a
    # slower one (2026-12-01, at this commit and at 0d40d83 alike)
    refused = [t for r, t in results if r == 503]
    assert not refused or max(refused) < 5, sorted(refused)[-5:]


def test_clients_that_leave_free_their_requests(server):
    """A storm of disconnects, streaming and not: the engine stops working for them."""
    for stream in (True, False):
        socks = []
        for _ in range(24):
            body = json.dumps(chat(max_tokens=400, stream=stream, ignore_eos=True)).encode()
            s = socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])))
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            socks.append(s)
        time.sleep(1.5)
        for s in socks:
            s.close()
        assert _idle_within(server, 10), _metrics(server)


def _metrics(url: str) -> dict[str, float]:
    """/metrics summed per sample name, without the qwen35_ray prefix (one engine replica)."""
    return {re.sub("^qwen35_ray[:_]", "", k): v for k, v in totals(url).items()}


def _idle_within(url: str, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        m = _metrics(url)
        if (
            m["num_requests_running"] == 0
            and m["num_requests_waiting"] == 0
            and m["state_slots_free"] == m["state_slots_total"]
            and m["kv_blocks_free"] == m["kv_blocks_total"]
        ):
            return True
        time.sleep(0.25)
    return False


def test_afterwards_the_replica_answers_as_before_with_nothing_leaked(server, greedy_before):
    assert _idle_within(server, 30), _metrics(server)
    tokens, replicas = greedy_before
    assert greedy(server) == tokens
    # the same replica answered: none died and was replaced on the way
    assert engine_replicas() == replicas and len(replicas) == 1
