"""The prefill/decode disaggregated app against the collocated one, on one real local Ray
cluster over real HTTP with the official `openai` client.

Both apps serve the embedded tiny checkpoint: the collocated app at /co, the disaggregated app
(2 prefill + 2 decode replicas) at /pd. Prompts under 16 tokens are prefilled on a decode
replica (conditional disaggregation); the rest move as RequestStates through the object store.
"""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import ray
import torch
from http_helpers import by_label, client, delta, metrics, prompt_ids
from json_schemas import WEATHER_ARGS
from ray import cloudpickle
from serve_fixtures import running_apps

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import state_nbytes
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving import transfer
from qwen35_ray.serving.builder import build_app, build_pd_app

MODEL = "qwen35-tiny"
MIN_PREFILL = 16
LENGTHS = [
    1,
    2,
    5,
    15,
    16,
    17,
    31,
    33,
    64,
    100,
    127,
    200,
    333,
    512,
    700,
    1000,
    1234,
    1500,
    1999,
    2000,
]


@pytest.fixture(scope="module")
def urls():
    common = {
        "model": MODEL,
        "dtype": "float32",
        "engine": {"max_num_seqs": 16, "max_model_len": 4096, "kv_cache_memory_bytes": 2**25},
        "ingress": {"num_cpus": 0.25},
    }
    co = build_app({**common, "llm_server": {"num_cpus": 0.25}})
    pd = build_pd_app(
        {
            **common,
            "disaggregation": {"min_prefill_tokens": MIN_PREFILL},
            "prefill_server": {"num_replicas": 2, "num_cpus": 0.25},
            "decode_server": {"num_replicas": 2, "num_cpus": 0.25},
        }
    )
    with running_apps({"co": ("/co", co), "pd": ("/pd", pd)}, num_cpus=8) as url:
        yield url + "/co", url + "/pd"


def complete(base: str, ids: list[int], stream: bool, **kw) -> tuple[str, list[str], str]:
    """(text, tokens, finish_reason) of one completion, streamed or not."""
    c = client(base)
    if not stream:
        choice = c.completions.create(model=MODEL, prompt=ids, logprobs=0, **kw).choices[0]
        return choice.text, choice.logprobs.tokens, choice.finish_reason
    text, tokens, reason = "", [], None
    for ev in c.completions.create(model=MODEL, prompt=ids, logprobs=0, stream=True, **kw):
        for ch in ev.choices:
            text += ch.text
            tokens += ch.logprobs.tokens if ch.logprobs else []
            reason = ch.finish_reason or reason
    return text, tokens, reason


def both(urls, jobs):
    """Run each (ids, stream, kwargs) job on both apps, 8 at a time."""
    with ThreadPoolExecutor(8) as pool:
        futures = [
            [pool.submit(complete, base, ids, stream, **kw) for base in urls]
            for ids, stream, kw in jobs
        ]
        return [[f.result() for f in pair] for pair in futures]


def test_disaggregated_equals_collocated(urls):
    before = metrics(urls[1])
    jobs = []
    for k, n in enumerate(LENGTHS):
        ids = prompt_ids(n, k)
        jobs.append((ids, False, dict(temperature=0, max_tokens=6)))
        jobs.append((ids, True, dict(temperature=1.0, top_p=0.9, seed=k, max_tokens=6)))
    for (ids, stream, kw), (co, pd) in zip(jobs, both(urls, jobs)):
        assert pd == co, f"{len(ids)}-token prompt, stream={stream}, {kw}"
        assert co[2] in ("stop", "length") and co[1]
    after = metrics(urls[1])
    moved = sum(n >= MIN_PREFILL for n in LENGTHS) * 2
    local = len(jobs) - moved
    assert delta(before, after, "qwen35_ray_requests_disaggregated_total") == moved
    assert delta(before, after, "qwen35_ray_requests_local_prefill_total") == local


def test_chat_streaming_equals_collocated(urls):
    messages = [{"role": "user", "content": "Plan a three-day trip to Kyoto, day by day."}]
    out = []
    for base in urls:
        parts = []
        for ev in client(base).chat.completions.create(
            model=MODEL, messages=messages, stream=True, temperature=0, max_tokens=20
        ):
            for ch in ev.choices:
                d = ch.delta
                parts.append((getattr(d, "reasoning_content", None) or "") + (d.content or ""))
        out.append("".join(parts))
    assert out[0] == out[1] and out[0]


# fp32 rounding only: the apps may compute a prompt in different pieces. The first test leaves a
# 33-token prompt in the prefix caches that shares 32 tokens with the logprobs test's; after it,
# a logprob of -4.8 differed by 1.4e-5 on one host (within 1e-5 when run alone). A wrong token's
# logprob is off by O(1).
LOGPROB_TOL = 1e-4


def close_logprobs(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(abs(got[t] - want[t]) < LOGPROB_TOL for t in want)


def test_logprobs_follow_the_request_to_decode(urls):
    """A moved request returns one logprob entry per token, with its top alternatives, equal
    to the collocated app's: completions (streamed) and chat (not streamed)."""
    name = "qwen35_ray_requests_disaggregated_total"
    before = metrics(urls[1])
    ids = prompt_ids(40, 7)
    runs = []
    for base in urls:
        tokens, lps, tops = [], [], []
        for ev in client(base).completions.create(
            model=MODEL,
            prompt=ids,
            logprobs=3,
            stream=True,
            temperature=0,
            max_tokens=8,
            extra_body={"ignore_eos": True},
        ):
            for ch in ev.choices:
                tokens += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
                tops += ch.logprobs.top_logprobs
        assert len(tokens) == len(lps) == len(tops) == 8
        runs.append((tokens, lps, tops))
    (co_tok, co_lp, co_top), (pd_tok, pd_lp, pd_top) = runs
    assert pd_tok == co_tok
    assert all(abs(a - b) < LOGPROB_TOL for a, b in zip(pd_lp, co_lp))
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(pd_top, co_top)) if not close_logprobs(a, b)]
    assert not bad, bad

    messages = [{"role": "user", "content": "Plan a three-day trip to Kyoto, day by day."}]
    chats = []
    for base in urls:
        r = client(base).chat.completions.create(
            model=MODEL,
            messages=messages,
            logprobs=True,
            top_logprobs=2,
            temperature=0,
            max_tokens=10,
            extra_body={"ignore_eos": True},
        )
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens == 10
        chats.append(
            [(c.token, c.logprob, {t.token: t.logprob for t in c.top_logprobs}) for c in content]
        )
    for (t0, lp0, top0), (t1, lp1, top1) in zip(*chats):
        assert t0 == t1 and abs(lp0 - lp1) < LOGPROB_TOL and close_logprobs(top1, top0)
    assert delta(before, metrics(urls[1]), name) == 2


def test_32_concurrent_streams_use_both_decode_replicas(urls):
    before = metrics(urls[1])
    jobs = [
        (prompt_ids(20 + 7 * i, 100 + i), True, dict(temperature=0, max_tokens=16))
        for i in range(32)
    ]
    with ThreadPoolExecutor(32) as pool:
        pd = list(pool.map(lambda j: complete(urls[1], j[0], j[1], **j[2]), jobs))
    co = [complete(urls[0], ids, False, **kw) for ids, _, kw in jobs]
    assert pd == co
    after = metrics(urls[1])
    name = "qwen35_ray_decode_replica_requests_total"
    was = by_label(before, name, "decode_replica")
    served = {r: n - was.get(r, 0) for r, n in by_label(after, name, "decode_replica").items()}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    assert sum(served.values()) == 32


def test_bytes_moved_equal_the_state_formula(urls):
    config = ModelConfig.from_hf(resolve_model(MODEL))
    for n in (37, 300):
        before = metrics(urls[1])
        complete(urls[1], prompt_ids(n, n), False, temperature=0, max_tokens=3)
        after = metrics(urls[1])
        grew = {
            k: delta(before, after, f"qwen35_ray_{k}", pool="OpenAIIngress")
            for k in ("transfer_bytes_total", "transfer_wire_bytes_total", "transfers_total")
        }

        # the prefill computed the n prompt tokens; the first sampled token is not yet in K/V
        assert grew["transfer_bytes_total"] == state_nbytes(config, torch.float32, n)
        # what the object store holds beyond the payload: the JSON header and the RNG state
        assert 0 < grew["transfer_wire_bytes_total"] - grew["transfer_bytes_total"] < 8192 + 8 * n
        assert grew["transfers_total"] == 1


def test_handoff_through_the_ingress_is_a_reference(urls, tmp_path):
    """What the prefill replica returns through the ingress is a few hundred bytes, whatever
    the state's size: the state itself stays in the object store until the decode side
    fetches it, and arrives intact."""
    engine = LLMEngine.from_pretrained(MODEL, dtype="float32", max_model_len=4096)
    # greedy: an unseeded sample can end the request at its first token (a stop token of the
    # random model; it hung a local CI run), and a finished prefill has nothing to hand off
    params = SamplingParams(max_tokens=4, temperature=0)
    engine.add_request("r", prompt_ids(500, 1), params, prefill_only=True)
    state = None
    while state is None and engine.has_unfinished():
        for out in engine.step():
            state = out.request_state
    assert state is not None, (out.error, out.outputs[0].finish_reason)
    assert ray.is_initialized()  # the cluster of the `urls` fixture
    handoff = transfer.send(state)
    assert handoff["nbytes"] == state.nbytes > 100_000
    assert len(cloudpickle.dumps(handoff)) < 1000
    got, _ = asyncio.run(transfer.receive(handoff))
    assert got.output_token_ids == state.output_token_ids
    for name, t in state.tensors.items():
        assert torch.equal(got.tensors[name], t)


def test_prefill_routing_follows_the_prefix(urls):
    """A repeated prompt goes to the prefill replica that computed it first, so it computes
    only the tokens after its last cached block boundary (300 -> 12)."""
    name = "qwen35_ray_prompt_tokens_computed_total"
    before = metrics(urls[1])
    for k in range(3):
        ids = prompt_ids(300, 400 + k)
        for _ in range(2):
            complete(urls[1], ids, False, temperature=0, max_tokens=2)
    after = metrics(urls[1])
    computed = delta(before, after, name, pool="PrefillServer")
    assert computed == 3 * (300 + 300 - 288)


def test_structured_outputs_follow_the_request_to_decode(urls):
    """The grammar state moves with the request: a JSON-schema answer and a forced tool call,
    prefilled on one pool and decoded on the other, validate and equal the collocated ones."""
    schema = WEATHER_ARGS
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    messages = [{"role": "user", "content": "What is the weather in Paris this week?"}]
    common = dict(
        model=MODEL,
        messages=messages,
        temperature=1.0,
        max_tokens=150,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    before = metrics(urls[1])
    outs = []
    for base in urls:
        c = client(base)
        parts = []
        for ev in c.chat.completions.create(
            **common,
            seed=11,
            stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        ):
            parts += [ch.delta.content or "" for ch in ev.choices]
        answer = json.loads("".join(parts))
        jsonschema.validate(answer, schema)
        (call,) = (
            c.chat.completions.create(**common, seed=12, tools=tools, tool_choice="required")
            .choices[0]
            .message.tool_calls
        )
        jsonschema.validate(json.loads(call.function.arguments), schema)
        outs.append((answer, call.function.name, call.function.arguments))
    assert outs[0] == outs[1]
    after = metrics(urls[1])
    assert delta(before, after, "qwen35_ray_requests_disaggregated_total") == 2


def test_decode_replica_killed_mid_run(urls):
    """Streams on a killed decode replica migrate to the other one and complete, as the others
    do; new requests succeed. Runs last: the cluster is one replica short until Serve restarts
    it. (tests/serving/test_migration.py checks the migrated texts against offline runs.)"""
    c = client(urls[1])
    progress = [0] * 8
    results: list = [None] * 8
    before = metrics(urls[1])

    def stream(i):
        try:
            tokens, reason = 0, None
            for ev in c.completions.create(
                model=MODEL,
                prompt=prompt_ids(40 + i, 200 + i),
                stream=True,
                temperature=0,
                max_tokens=400,
                logprobs=0,
                extra_body={"ignore_eos": True},
            ):
                progress[i] += len(ev.choices)
                for ch in ev.choices:
                    tokens += len(ch.logprobs.tokens) if ch.logprobs else 0
                    reason = ch.finish_reason or reason
            results[i] = (tokens, reason)
        except openai.APIError as e:
            results[i] = e

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(8)]
        deadline = time.time() + 60
        while min(progress) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert min(progress) >= 3, "the streams did not start"
        victim = next(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "#DecodeServer#" in a["name"]
        )
        ray.kill(ray.get_actor(victim, namespace="serve"))
        for f in futures:
            f.result(timeout=180)
    assert results == [(400, "length")] * 8, results
    after = metrics(urls[1])
    served = "qwen35_ray_decode_replica_requests_total"
    on_victim = victim.rsplit("#", 1)[1]
    moved = by_label(after, served, "decode_replica").get(on_victim, 0) - by_label(
        before, served, "decode_replica"
    ).get(on_victim, 0)
    assert 0 < moved < 8
    assert delta(before, after, "qwen35_ray_migrations_total") == moved
    # new requests succeed while Serve replaces the replica
    for i in range(4):
        text, tokens, reason = complete(urls[1], prompt_ids(30, 300 + i), False, max_tokens=4)
        assert reason in ("stop", "length") and tokens
