"""Speculative decoding across a disaggregated hand-off (issue 22), over real HTTP with the
official `openai` client: a prefill pool and a decode pool that both decode speculatively with
the MTP head (k = 2) against a collocated app without speculation, on a checkpoint whose head
was distilled from a chained main model, so drafts are kept. Greedy completions, streamed or
not, with stop strings and max_tokens that end mid-draft, and a JSON-schema answer, equal the
collocated ones token for token; the request's MTP K/V and drafts travel in its RequestState."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from http_helpers import client, delta, metrics
from json_schemas import WEATHER_ARGS
from serve_fixtures import running_apps

from qwen35_ray.model.mtp_distill import ordinary_token_ids
from qwen35_ray.serving.builder import build_app, build_pd_app

MIN_PREFILL = 16
SPEC = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def apps(chain_checkpoint):
    path = chain_checkpoint("qwen35-tiny")
    engine = {"max_num_seqs": 16, "max_model_len": 1024, "kv_cache_memory_bytes": 2**25}
    common = {"model": str(path), "dtype": "float32", "ingress": {"num_cpus": 0.25}}
    co = build_app({**common, "engine": engine, "llm_server": {"num_cpus": 0.25}})
    pd = build_pd_app(
        {
            **common,
            "engine": {**engine, "speculative": SPEC},
            "disaggregation": {"min_prefill_tokens": MIN_PREFILL},
            "prefill_server": {"num_replicas": 1, "num_cpus": 0.25},
            "decode_server": {"num_replicas": 1, "num_cpus": 0.25},
        }
    )
    with running_apps({"co": ("/co", co), "pd": ("/pd", pd)}, num_cpus=6) as url:
        yield path, (url + "/co", url + "/pd")


def complete(base: str, model: str, ids: list[int], stream: bool, **kw):
    c = client(base)
    if not stream:
        choice = c.completions.create(model=model, prompt=ids, **kw).choices[0]
        return choice.text, choice.finish_reason
    text, reason = "", None
    for ev in c.completions.create(model=model, prompt=ids, stream=True, **kw):
        for ch in ev.choices:
            text += ch.text
            reason = ch.finish_reason or reason
    return text, reason


def test_speculative_handoff_equals_collocated(apps):
    path, urls = apps
    model = client(urls[0]).models.list().data[0].id
    vocab = ordinary_token_ids(path).tolist()
    prompts = [vocab[7 * i : 7 * i + MIN_PREFILL + 5 * i] for i in range(16)]
    jobs = [(ids, i % 2 == 1, dict(temperature=0, max_tokens=24 + i % 5)) for i, ids in
            enumerate(prompts)]  # fmt: skip
    before = metrics(urls[1])
    with ThreadPoolExecutor(16) as pool:
        futures = [[pool.submit(complete, b, model, ids, s, **kw) for b in urls]
                   for ids, s, kw in jobs]  # fmt: skip
        outs = [[f.result() for f in pair] for pair in futures]
    for (ids, stream, _), (co, pd) in zip(jobs, outs):
        assert pd == co, f"{len(ids)}-token prompt, stream={stream}"
    # stop strings cut mid-draft: a stop taken from inside each collocated text
    stops = []
    for (ids, _, kw), ((text, _), _) in zip(jobs[:6], outs[:6]):
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        stops.append((ids, False, dict(kw, stop=[stop])))
    with ThreadPoolExecutor(12) as pool:
        futures = [[pool.submit(complete, b, model, ids, s, **kw) for b in urls]
                   for ids, s, kw in stops]  # fmt: skip
        for pair in futures:
            co, pd = (f.result() for f in pair)
            assert pd == co and co[1] == "stop"
    after = metrics(urls[1])
    assert delta(before, after, "qwen35_ray_requests_disaggregated_total") == len(jobs) + 6
    # the decode pool kept drafts (the counters of engine/spec_stats.py, vLLM's names)
    assert delta(before, after, "qwen35_ray:spec_decode_num_accepted_tokens_total") > 0
    assert delta(before, after, "qwen35_ray:spec_decode_num_drafts_total") > 0


def test_json_schema_answer_through_speculative_handoff(apps):
    path, urls = apps
    model = client(urls[0]).models.list().data[0].id
    schema = WEATHER_ARGS
    outs = []
    for base in urls:
        r = client(base).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the weather in Paris this week?"}],
            temperature=0,
            max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        answer = json.loads(r.choices[0].message.content)
        jsonschema.validate(answer, schema)
        outs.append(answer)
    assert outs[0] == outs[1]
