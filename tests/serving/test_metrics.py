"""/metrics and the request log after a load run, on the collocated app (/co) and the
disaggregated one with two ingress replicas (/pd), over real HTTP on one local Ray cluster; and
the Grafana dashboard's queries against what those apps export.

Each app gets the same load: chat and completions, streamed and not, n=2, a prompt sent twice
(a prefix-cache hit), a 400, then a stream the client leaves. Every request carries its own
x-request-id, which Serve keeps, so its log line can be found.
"""

import json
import re
import time
from pathlib import Path

import pytest
import requests
from http_helpers import client, metrics, parse, series, total
from serve_fixtures import running_apps

from qwen35_ray.cli import main as cli
from qwen35_ray.serving.builder import build_app, build_pd_app

# slow tier (.ci/run): two apps under a load run, scraped until settled
pytestmark = pytest.mark.slow

MODEL = "qwen35-tiny"
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"
# a user message whose prompt is a few blocks long, so its second sending hits the prefix cache
LONG = "Tell me about the weather in Paris, Lyon, Lille and Nice in spring. " * 4
SECRET = "the word zanzibar is in this prompt"
HISTOGRAMS = (
    "qwen35_ray:time_to_first_token_seconds",
    "qwen35_ray:inter_token_latency_seconds",
    "qwen35_ray:e2e_request_latency_seconds",
    "qwen35_ray:request_queue_time_seconds",
    "qwen35_ray:request_prefill_time_seconds",
    "qwen35_ray:request_decode_time_seconds",
    "qwen35_ray:request_prompt_tokens",
    "qwen35_ray:request_generation_tokens",
    "qwen35_ray_http_request_duration_seconds",
    "qwen35_ray_http_time_to_first_token_seconds",
)


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    tiny = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(tiny)])
    common = {
        "model": str(tiny),
        "served_model_name": MODEL,
        "dtype": "float32",
        "engine": {"max_num_seqs": 8, "max_model_len": 2048, "kv_cache_memory_bytes": 2**25},
    }
    co = build_app({**common, "ingress": {"num_cpus": 0.25}, "llm_server": {"num_cpus": 0.5}})
    pd = build_pd_app(
        {
            **common,
            "log_prompts": True,
            "disaggregation": {"min_prefill_tokens": 16},
            "ingress": {"num_replicas": 2, "num_cpus": 0.25},
            "prefill_server": {"num_cpus": 0.5},
            "decode_server": {"num_cpus": 0.5},
        }
    )
    with running_apps({"co": ("/co", co), "pd": ("/pd", pd)}) as url:
        yield {"co": url + "/co", "pd": url + "/pd"}


def run_load(base: str, tag: str) -> dict:
    """The load, with each request's id and usage; the 400 and the left stream have none."""
    c = client(base)
    ids: dict[str, dict | None] = {}
    fixed = {"temperature": 0, "max_tokens": 6}

    def rid(kind: str) -> dict:
        name = f"{tag}-{kind}-{len(ids)}"
        ids[name] = None
        return {"x-request-id": name}

    def chat(text: str, **kw):
        headers = rid(f"chat-n{kw.get('n', 1)}")
        out = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}],
            extra_headers=headers,
            **{**fixed, **kw},
        )
        if kw.get("stream"):
            usage = None
            for event in out:
                usage = event.usage or usage
            out = usage
        else:
            out = out.usage
        ids[headers["x-request-id"]] = {"prompt": out.prompt_tokens, "gen": out.completion_tokens}

    chat(LONG)
    chat(LONG + " " + SECRET)
    chat(LONG, stream=True, stream_options={"include_usage": True})
    chat("Hi!", stream=True, stream_options={"include_usage": True}, max_tokens=3)
    chat("Two answers, please.", n=2, extra_body={"ignore_eos": True})
    for stream in (False, True):
        headers = rid("completion")
        out = c.completions.create(
            model=MODEL,
            prompt=list(range(20, 60)),
            extra_headers=headers,
            stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
            **fixed,
        )
        u = [e.usage for e in out if e.usage][0] if stream else out.usage
        ids[headers["x-request-id"]] = {"prompt": u.prompt_tokens, "gen": u.completion_tokens}
    bad = requests.post(
        base + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        headers=rid("bad"),
        timeout=30,
    )
    assert bad.status_code == 400
    return ids


def leave_a_stream(base: str, tag: str) -> str:
    """A stream whose client leaves after its first chunk; returns its request id."""
    name = f"{tag}-left"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with requests.post(
        base + "/v1/chat/completions",
        json=body,
        headers={"x-request-id": name},
        stream=True,
        timeout=60,
    ) as r:
        next(r.iter_lines())
    return name


def settled(base: str, check, timeout: float = 20.0):
    """/metrics once check(samples) holds (a stream's end reaches a replica's counters just
    after its client has it); the last reading otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        found = metrics(base)
        if check(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def engine_total(found, name: str, **labels) -> float:
    return sum(
        total(found, name, pool=pool, **labels)
        for pool in ("LLMServer", "PrefillServer", "DecodeServer")
    )


def load_and_leave(base: str, tag: str) -> dict:
    """The load, /metrics once it settled, a stream left, /metrics again."""
    ids = run_load(base, tag)
    done = [u for u in ids.values() if u is not None]
    e2e = "qwen35_ray:e2e_request_latency_seconds_count"
    before = settled(base, lambda f: engine_total(f, e2e) == len(done))
    left = leave_a_stream(base, tag)

    def aborted(f) -> bool:
        n = engine_total(f, "qwen35_ray:request_success_total", finished_reason="abort")
        return n == 1 and total(f, "qwen35_ray_http_requests_total") == len(ids) + 1

    after = settled(base, aborted)
    return {"ids": ids, "done": done, "left": left, "before": before, "after": after}


@pytest.fixture(scope="module")
def loaded(apps):
    """Both apps after their load: /metrics before the left stream, then after it."""
    return {name: load_and_leave(apps[name], name) for name in ("co", "pd")}


@pytest.mark.parametrize("app", ["co", "pd"])
def test_counts_after_a_load_run_match_the_requests_sent(loaded, app):
    run = loaded[app]
    done, before, after = run["done"], run["before"], run["after"]
    sent = len(run["ids"]) + 1
    # every request once at the ingress, by status: the 400, the rest 200 (the left stream too)
    assert total(after, "qwen35_ray_http_requests_total") == sent
    assert total(after, "qwen35_ray_http_requests_total", status="400") == 1
    assert total(after, "qwen35_ray_http_requests_total", status="200") == sent - 1
    # every request that reached an engine ended once there, by finish reason
    ended = engine_total(after, "qwen35_ray:request_success_total")
    assert ended == len(done) + 1
    assert engine_total(after, "qwen35_ray:request_success_total", finished_reason="abort") == 1
    assert engine_total(before, "qwen35_ray:request_success_total", finished_reason="abort") == 0
    # one TTFT, end-to-end, queue time and length per completed request, over all pools
    for name in (
        "qwen35_ray:time_to_first_token_seconds",
        "qwen35_ray:e2e_request_latency_seconds",
        "qwen35_ray:request_queue_time_seconds",
        "qwen35_ray:request_prompt_tokens",
        "qwen35_ray:request_generation_tokens",
    ):
        assert engine_total(before, name + "_count") == len(done), name
    # the token counters are the usage the clients got
    prompt, gen = sum(u["prompt"] for u in done), sum(u["gen"] for u in done)
    assert engine_total(before, "qwen35_ray:prompt_tokens_total") == prompt
    assert engine_total(before, "qwen35_ray:generation_tokens_total") == gen
    assert engine_total(before, "qwen35_ray:request_generation_tokens_sum") == gen
    # each sequence's prompt looked up once (the n=2 request's twice); the long prompt sent
    # again found its first blocks
    queries = engine_total(before, "qwen35_ray:prefix_cache_queries_total")
    hits = engine_total(before, "qwen35_ray:prefix_cache_hits_total")
    (twice,) = [u["prompt"] for k, u in run["ids"].items() if "-chat-n2-" in k]
    assert queries == prompt + twice and 16 <= hits < queries
    # the client side: a first token for every request that got one, the left stream too
    assert total(after, "qwen35_ray_http_time_to_first_token_seconds_count") == len(done) + 1
    assert total(before, "qwen35_ray_http_request_duration_seconds_count") == len(done)
    # nothing left running once the left stream is aborted
    assert engine_total(after, "qwen35_ray:num_requests_running") == 0


@pytest.mark.parametrize("app", ["co", "pd"])
def test_every_replica_is_in_one_scrape_and_histograms_are_well_formed(loaded, app):
    found = loaded[app]["after"]
    scraped = series(found, "qwen35_ray_replica_scraped")
    pools = sorted(dict(k)["pool"] for k in scraped)
    expected = ["LLMServer", "OpenAIIngress"] if app == "co" else ["DecodeServer"]
    if app == "pd":
        expected += ["OpenAIIngress", "OpenAIIngress", "PrefillServer"]
    assert pools == expected and all(v == 1 for v in scraped.values())
    for name in HISTOGRAMS:
        buckets = [(la, v) for n, la, v in found if n == name + "_bucket"]
        assert buckets, name
        by_series: dict[tuple, list] = {}
        for la, v in buckets:
            key = tuple(sorted((k, w) for k, w in la.items() if k != "le"))
            by_series.setdefault(key, []).append((float(la["le"]), v))
        for key, edges in by_series.items():
            edges.sort()
            counts = [v for _, v in edges]
            assert counts == sorted(counts), (name, key)
            assert edges[-1][0] == float("inf")
            assert counts[-1] == total(found, name + "_count", **dict(key)), (name, key)
    # engine series carry pool, replica and model_name
    for _, la, _ in (s for s in found if s[0] == "qwen35_ray:generation_tokens_total"):
        assert {"pool", "replica", "model_name"} <= set(la) and la["model_name"] == MODEL


def log_lines(app: str) -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [
        line
        for path in logs.glob(f"replica_{app}_OpenAIIngress_*.log")
        for line in path.read_text(errors="replace").splitlines()
        if " request id=" in line
    ]


def fields(line: str) -> dict[str, str]:
    body = line[line.index(" request id=") + len(" request ") :]
    prompt = None
    if " prompt=" in body:
        body, prompt = body.split(" prompt=", 1)
    out = dict(part.split("=", 1) for part in body.split())
    if prompt is not None:
        out["prompt"] = json.loads(prompt)
    return out


@pytest.mark.parametrize("app", ["co", "pd"])
def test_one_log_line_per_request(loaded, app):
    run = loaded[app]
    mine = {*run["ids"], run["left"]}
    deadline = time.monotonic() + 10
    while True:
        lines = [fields(line) for line in log_lines(app)]
        lines = [f for f in lines if f["id"] in mine]
        if len(lines) >= len(mine) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(f["id"] for f in lines) == sorted(mine)
    for f in lines:
        usage = run["ids"].get(f["id"])
        assert float(f["total_s"]) > 0
        if "-bad-" in f["id"]:
            assert f["status"] == "400" and f["ttft_s"] == "-" and f["prompt_tokens"] == "0"
            continue
        assert f["status"] == "200" and f["method"] == "POST"
        assert f["route"] in ("/v1/chat/completions", "/v1/completions")
        assert 0 < float(f["ttft_s"]) <= float(f["total_s"])
        if usage is None:  # the stream its client left
            assert f.get("client_gone") == "1" and "abort" in f["finish"], f
            continue
        assert int(f["prompt_tokens"]) == usage["prompt"]
        assert int(f["completion_tokens"]) == usage["gen"]
        assert "client_gone" not in f and f["finish"] in ("length", "stop", "length,stop")
        # prompt text only where log_prompts is on (the disaggregated app)
        assert bool(f.get("prompt")) == (app == "pd")
    if app == "co":
        assert not any(SECRET in line for line in log_lines(app))
    else:
        assert any(SECRET in f.get("prompt", "") for f in lines)


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return [e for e in exprs if e]


def test_dashboard_queries_name_exported_metrics(apps, loaded):
    exported: dict[str, str] = {}
    for name in ("co", "pd"):
        text = requests.get(apps[name] + "/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split()
                exported[family] = kind
    queries = dashboard_queries()
    assert len(queries) >= 12
    named = set()
    for q in queries:
        names = re.findall(r"qwen35_ray[:_][A-Za-z0-9_:]*", q)
        assert names, f"the query names no qwen35-ray metric: {q}"
        for n in names:
            base = re.sub(r"_(bucket|sum|count)$", "", n)
            if n in exported or (base in exported and exported[base] == "histogram"):
                named.add(n)
                continue
            pytest.fail(f"{n} in {q!r} is not exported by /metrics")
    # the latency percentiles, throughput and occupancy panels are there
    for wanted in (
        "qwen35_ray:time_to_first_token_seconds_bucket",
        "qwen35_ray:inter_token_latency_seconds_bucket",
        "qwen35_ray:e2e_request_latency_seconds_bucket",
        "qwen35_ray:generation_tokens_total",
        "qwen35_ray:kv_cache_usage_perc",
        "qwen35_ray_state_slot_usage_perc",
    ):
        assert wanted in named, wanted


def test_metrics_reference_lists_every_exported_family(apps, loaded):
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name in ("co", "pd"):
        text = requests.get(apps[name] + "/metrics", timeout=30).text
        for family in {n for n, _, _ in parse(text)}:
            base = re.sub(r"_(bucket|sum|count|total)$", "", family)
            assert re.search(f"`({re.escape(base)}|{re.escape(family)})[`{{]", doc), family
