"""The metrics and request log pieces without Ray: an engine replica's request timing, families
merged from several replicas and rendered by prometheus_client, and the ingress middleware's
log line and HTTP counts on an ASGI app driven by hand."""

import asyncio
import logging

import pytest
from fastapi import FastAPI
from http_helpers import parse, series, total
from starlette.responses import StreamingResponse

from qwen35_ray.serving.metrics import exposition, merge
from qwen35_ray.serving.metrics_catalog import BUCKETS, families, help_of, token_buckets
from qwen35_ray.serving.metrics_engine import EngineMetrics, request_reason
from qwen35_ray.serving.request_log import (
    IngressMetrics,
    RequestLog,
    RequestLogMiddleware,
    tap,
)

STATS = {
    "running": 1,
    "waiting": 2,
    "preemptions_total": 3,
    "prefix_cache_queries_total": 40,
    "prefix_cache_hits_total": 16,
    "kv_blocks_total": 100,
    "kv_blocks_free": 75,
    "state_slots_total": 8,
    "state_slots_free": 6,
    "generation_tokens_total": 99,
    "requests_total": 5,
    "labelled": [("expert_bytes_resident", {"rank": "0"}, 10)],
}


def engine(replica: str = "r1") -> EngineMetrics:
    return EngineMetrics("LLMServer", replica, "tiny", 2048, lambda: dict(STATS))


def render(*sources) -> tuple[str, list]:
    text = exposition(merge([list(s.collect()) for s in sources]), None)[0].decode()
    return text, parse(text)


def test_a_request_is_timed_once_and_its_tokens_counted():
    m = engine()
    timer = m.request(7)
    timer.step(0, 0.25)  # scheduled, no token yet
    timer.step(1, 0.25)
    timer.step(2, 0.25)  # n = 2: one step, two tokens
    timer.finish("length")
    _, found = render(m)
    assert total(found, "qwen35_ray:time_to_first_token_seconds_count") == 1
    assert total(found, "qwen35_ray:inter_token_latency_seconds_count") == 1
    assert total(found, "qwen35_ray:request_queue_time_seconds_count") == 1
    assert total(found, "qwen35_ray:request_queue_time_seconds_sum") == 0.25
    assert total(found, "qwen35_ray:e2e_request_latency_seconds_count") == 1
    assert total(found, "qwen35_ray:prompt_tokens_total") == 7
    assert total(found, "qwen35_ray:generation_tokens_total") == 3
    assert total(found, "qwen35_ray:request_generation_tokens_sum") == 3
    assert total(found, "qwen35_ray:request_success_total", finished_reason="length") == 1
    assert total(found, "qwen35_ray:request_success_total", finished_reason="stop") == 0


def test_imports_resumes_handoffs_and_aborts():
    m = engine()
    imported = m.request(7, "imported", generated=1)  # its first token came from prefill
    imported.step(1, 0.0)
    imported.finish("stop")
    resumed = m.request(7, "resumed", generated=4)
    resumed.step(1, 0.5)
    resumed.finish("abort")
    handed_off = m.request(9)
    handed_off.step(1, 0.1)
    handed_off.finish(None)  # a prefill: the request ends on a decode replica
    _, found = render(m)
    # TTFT and prompt only where the prompt was prefilled from nothing (the handed-off one)
    assert total(found, "qwen35_ray:time_to_first_token_seconds_count") == 1
    assert total(found, "qwen35_ray:prompt_tokens_total") == 9
    # no queue time for the import, which joins the running batch at once
    assert total(found, "qwen35_ray:request_queue_time_seconds_count") == 2
    # the import's length counts its prefill token; only completed requests have one
    assert total(found, "qwen35_ray:request_generation_tokens_count") == 1
    assert total(found, "qwen35_ray:request_generation_tokens_sum") == 2
    assert total(found, "qwen35_ray:generation_tokens_total") == 3
    assert total(found, "qwen35_ray:request_success_total") == 2
    assert total(found, "qwen35_ray:request_success_total", finished_reason="abort") == 1


def test_request_reason():
    assert request_reason(["stop", "length"]) == "stop"
    assert request_reason(["length", "abort"]) == "abort"
    assert request_reason(["abort", "error"]) == "error"


def test_replicas_merge_into_one_family_each():
    text, found = render(engine("r1"), engine("r2"))
    for name in ("qwen35_ray:time_to_first_token_seconds", "qwen35_ray:num_requests_running"):
        assert text.count(f"# TYPE {name} ") == 1
    running = series(found, "qwen35_ray:num_requests_running")
    assert sorted(dict(k)["replica"] for k in running) == ["r1", "r2"]
    assert all(dict(k)["model_name"] == "tiny" for k in running)
    # the engine stats read at scrape time, as vLLM names them where vLLM has them
    assert total(found, "qwen35_ray:kv_cache_usage_perc", replica="r1") == 0.25
    assert total(found, "qwen35_ray_state_slot_usage_perc", replica="r1") == 0.25
    assert total(found, "qwen35_ray:num_preemptions_total", replica="r1") == 3
    assert total(found, "qwen35_ray_expert_bytes_resident", rank="0") == 20
    assert "# TYPE qwen35_ray_requests_total counter" in text
    assert "# TYPE qwen35_ray_state_slots_total gauge" in text
    # the engine's own count of sampled tokens gives way to the streamed count
    assert "qwen35_ray_generation_tokens_total" not in text


SPEC = {
    "spec_decode_num_drafts_total": 10,
    "spec_decode_num_draft_tokens_total": 30,
    "spec_decode_num_accepted_tokens_total": 17,
    "spec_decode_num_accepted_tokens_per_pos": [9, 5, 3],
}


def test_speculative_counters_under_vllms_names_with_a_position_label():
    m = EngineMetrics("LLMServer", "r1", "tiny", 2048, lambda: {**STATS, **SPEC})
    text, found = render(m)
    assert total(found, "qwen35_ray:spec_decode_num_drafts_total") == 10
    assert total(found, "qwen35_ray:spec_decode_num_draft_tokens_total") == 30
    assert total(found, "qwen35_ray:spec_decode_num_accepted_tokens_total") == 17
    per_pos = series(found, "qwen35_ray:spec_decode_num_accepted_tokens_per_pos_total")
    # vLLM's position label, from 0, beside the replica's labels
    assert {dict(k)["position"]: v for k, v in per_pos.items()} == {"0": 9, "1": 5, "2": 3}
    assert all(dict(k)["replica"] == "r1" for k in per_pos)
    for name in ("drafts", "draft_tokens", "accepted_tokens", "accepted_tokens_per_pos"):
        assert f"# TYPE qwen35_ray:spec_decode_num_{name}_total counter" in text
    # replacing qwen35_ray: by vllm: gives vLLM's names: no project-named twin beside them
    assert "qwen35_ray_spec_decode" not in text


def test_a_speculative_engines_own_stats_reach_metrics():
    from qwen35_ray.engine.llm_engine import LLMEngine
    from qwen35_ray.engine.sampling_params import SamplingParams

    k = 2
    eng = LLMEngine.from_pretrained(
        "qwen35-tiny", speculative={"method": "mtp", "num_speculative_tokens": k}
    )
    eng.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while not any(out.finished for out in eng.step()):
        pass
    # what LLMServer.stats() hands its metrics (waiting_prompt_tokens is for the routers)
    stats = {k: v for k, v in eng.load_stats().items() if k != "waiting_prompt_tokens"}
    _, found = render(EngineMetrics("LLMServer", "r1", "tiny", 2048, lambda: stats))
    drafts = total(found, "qwen35_ray:spec_decode_num_drafts_total")
    assert drafts == stats["spec_decode_num_drafts_total"] > 0
    assert total(found, "qwen35_ray:spec_decode_num_draft_tokens_total") == k * drafts
    per_pos = series(found, "qwen35_ray:spec_decode_num_accepted_tokens_per_pos_total")
    assert sorted(dict(key)["position"] for key in per_pos) == ["0", "1"]
    accepted = total(found, "qwen35_ray:spec_decode_num_accepted_tokens_total")
    assert sum(per_pos.values()) == accepted


def test_no_speculative_families_when_it_is_off():
    text, _ = render(engine())
    assert "spec_decode" not in text


def test_a_list_stat_needs_an_index_label():
    m = EngineMetrics("LLMServer", "r1", "tiny", 2048, lambda: {**STATS, "new_per_rank": [1]})
    with pytest.raises(KeyError, match="qwen35_ray_new_per_rank has a list"):
        m.collect()


def test_openmetrics_when_the_scraper_asks():
    found = list(engine().collect())
    body, content_type = exposition(found, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")
    assert exposition(found, None)[1].startswith("text/plain")


def test_every_family_has_help_and_buckets_follow_vllm():
    with pytest.raises(KeyError, match="qwen35_ray_nonsense"):
        help_of("qwen35_ray_nonsense_total")
    assert list(families([("qwen35_ray_autoscaling_pool_x", {"pool": "P"}, 1)]))
    assert token_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert len(BUCKETS["ttft"]) == 22 and BUCKETS["ttft"][-1] == 2560.0
    # vLLM's 19 ITL edges after 4 of 1 to 7.5 ms, its 21 request-time edges after 6 below 0.3 s
    assert BUCKETS["itl"][:5] == [0.001, 0.0025, 0.005, 0.0075, 0.01] and len(BUCKETS["itl"]) == 23
    assert BUCKETS["request"][6] == 0.3 and len(BUCKETS["request"]) == 27
    assert BUCKETS["itl"][-1] == 80.0 and BUCKETS["request"][-1] == 7680.0
    for edges in BUCKETS.values():
        assert edges == sorted(set(edges))


@pytest.fixture
def lines():
    """The request log's lines."""
    out: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: out.append(record.getMessage())
    logger = logging.getLogger("ray.serve.requests")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


def app_with_log(log_prompts: bool) -> tuple[FastAPI, IngressMetrics]:
    app = FastAPI()
    app.add_middleware(RequestLogMiddleware)
    counters = [("qwen35_ray_migrations_total", {}, 0)]
    metrics = IngressMetrics("OpenAIIngress", "i1", "tiny", lambda: counters)
    app.state.request_log = RequestLog(metrics, True, log_prompts, lambda ids: f"<{len(ids)}>")
    closed = []

    async def replica_stream():
        try:
            for token in (5, 6, 7):
                yield {"outputs": [{"index": 0, "token_ids": [token], "finish_reason": None}]}
                await asyncio.sleep(0.01)
            yield {"outputs": [{"index": 0, "token_ids": [], "finish_reason": "stop"}]}
        finally:
            closed.append(True)

    @app.post("/v1/completions")
    async def gen():
        async def body():
            async for step in tap(replica_stream(), [1, 2, 3, 4]):
                yield f"data: {step}\n\n"

        return StreamingResponse(body())

    @app.post("/boom")
    async def boom():
        raise RuntimeError("boom")

    @app.get("/metrics")
    async def scrape():
        return {}

    app.state.closed = closed
    return app, metrics


async def call(app, path: str, method: str = "POST", leave_after: int | None = None) -> list:
    """Drive the ASGI app once; leave_after: the client disconnects after that many chunks."""
    sent, gone = [], asyncio.Event()
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if leave_after is not None and len(bodies) >= leave_after:
            gone.set()

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "headers": [(b"x-request-id", b"req\n1")],
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
        "http_version": "1.1",
        # before ASGI 2.4 a StreamingResponse listens for the client's disconnect
        "asgi": {"version": "3.0", "spec_version": "2.3"},
    }
    try:
        await app(scope, receive, send)
    except RuntimeError:
        pass
    return sent


def fields(line: str) -> dict:
    head, _, prompt = line.partition(" prompt=")
    out = dict(part.split("=", 1) for part in head.removeprefix("request ").split())
    return out | ({"prompt": prompt} if prompt else {})


def test_one_line_per_request_with_its_tokens_and_no_prompt_by_default(lines):
    app, metrics = app_with_log(False)
    asyncio.run(call(app, "/v1/completions"))
    asyncio.run(call(app, "/metrics", "GET"))  # scrapes are neither logged nor counted
    (line,) = [fields(x) for x in lines]
    assert line["id"] == "req_1"  # a client's id is logged in safe characters only
    assert line["route"] == "/v1/completions" and line["status"] == "200"
    assert (line["prompt_tokens"], line["completion_tokens"], line["finish"]) == ("4", "3", "stop")
    assert 0 < float(line["ttft_s"]) <= float(line["total_s"])
    assert "prompt" not in line and "client_gone" not in line
    found = parse(exposition(metrics.collect(), None)[0].decode())
    assert total(found, "qwen35_ray_http_requests_total") == 1
    assert total(found, "qwen35_ray_http_requests_total", route="/v1/completions") == 1
    assert total(found, "qwen35_ray_http_time_to_first_token_seconds_count") == 1
    assert total(found, "qwen35_ray_migrations_total", pool="OpenAIIngress") == 0


def test_prompts_when_enabled_failures_and_clients_that_leave(lines):
    app, metrics = app_with_log(True)
    asyncio.run(call(app, "/v1/completions"))
    asyncio.run(call(app, "/v1/completions", leave_after=2))
    asyncio.run(call(app, "/boom"))
    ok, left, boom = [fields(x) for x in lines]
    assert ok["prompt"] == '"<4>"'
    assert left["status"] == "200" and left["client_gone"] == "1" and "abort" in left["finish"]
    # the replica stream was closed when the client left, so its request is cancelled
    assert app.state.closed == [True, True]
    assert boom["status"] == "500" and "client_gone" not in boom
    found = parse(exposition(metrics.collect(), None)[0].decode())
    assert total(found, "qwen35_ray_http_requests_total", status="200") == 2
    assert total(found, "qwen35_ray_http_requests_total", status="500") == 1
    assert total(found, "qwen35_ray_http_request_duration_seconds_count") == 2
