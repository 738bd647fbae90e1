"""`qwen35-ray bench serve` without Ray: its figures on fixed inputs, its SSE reading, its
arrivals and concurrency, its workloads, and whole runs against a stub SSE server."""

import asyncio
import json
import math
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen35_ray.bench import serve, serve_client, serve_data, serve_report
from qwen35_ray.bench.serve_client import BenchRequest, Endpoint, SSEParser
from qwen35_ray.bench.serve_metrics import (
    RequestRecord,
    distribution,
    parse_goodput,
    peak_concurrency,
    peak_output_tokens_per_s,
    summarize,
)


def record(ttft, itl, out, start=0.0, prompt=10):
    return RequestRecord(prompt_len=prompt, output_tokens=out, start_time=start, ttft=ttft,
                         itl=list(itl), latency=ttft + sum(itl), success=True)  # fmt: skip


def test_distribution_is_numpys_linear_percentiles_and_population_std_in_ms():
    out = distribution("ttft", [x / 1000 for x in range(10, 0, -1)], [50, 90, 99, 99.9])
    assert out["mean_ttft_ms"] == pytest.approx(5.5)
    assert out["median_ttft_ms"] == out["p50_ttft_ms"] == pytest.approx(5.5)
    assert out["p90_ttft_ms"] == pytest.approx(9.1) and out["p99_ttft_ms"] == pytest.approx(9.91)
    assert out["p99.9_ttft_ms"] == pytest.approx(9.991)
    assert out["std_ttft_ms"] == pytest.approx(math.sqrt(8.25))
    # no values: unmeasured, not zero
    assert set(distribution("tpot", [], [99]).values()) == {None}


def test_tpot_excludes_the_first_token_and_one_token_requests_have_none():
    r = record(0.5, [0.1, 0.2, 0.3], out=4)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert record(0.5, [], out=1).tpot is None


def test_goodput_counts_requests_meeting_every_slo_per_second_of_the_run():
    records = [
        record(0.1, [0.02] * 3, out=4),  # ttft 100 ms, tpot 20 ms: good
        record(0.3, [0.02] * 3, out=4),  # ttft too long
        record(0.1, [0.09] * 3, out=4),  # tpot too long
        record(0.15, [], out=1),  # one token: tpot counts as 0, good
        RequestRecord(error="HTTP 503", success=False),
    ]
    slo = parse_goodput(["ttft:200", "tpot:50"])
    assert slo == {"ttft": 200.0, "tpot": 50.0}
    out = summarize(records, duration=2.0, percentiles=[50], slo=slo)
    assert out["request_goodput"] == pytest.approx(2 / 2.0)
    assert (out["completed"], out["failed"]) == (4, 1)
    assert summarize(records, 2.0, [50])["request_goodput"] is None
    # the e2el SLO is on the whole latency
    assert summarize(records, 1.0, [50], {"e2el": 160})["request_goodput"] == 2
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_summary_throughputs_are_totals_over_the_duration_and_percentiles_ordered():
    records = [record(0.1 * i, [0.01 * i] * 7, out=8, start=0.2 * i, prompt=32) for i in (1, 2, 3)]
    out = summarize(records, duration=4.0, percentiles=[50, 90, 99])
    assert (out["total_input_tokens"], out["total_output_tokens"]) == (96, 24)
    assert out["request_throughput"] == pytest.approx(3 / 4)
    assert out["output_throughput"] == pytest.approx(24 / 4)
    assert out["total_token_throughput"] == pytest.approx(120 / 4)
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert out[f"p50_{name}_ms"] <= out[f"p90_{name}_ms"] <= out[f"p99_{name}_ms"]
    # one token per chunk: a request's mean ITL is its TPOT
    assert out["mean_tpot_ms"] == pytest.approx(out["mean_itl_ms"])
    assert out["mean_ttft_ms"] == pytest.approx(200)


def test_peak_tokens_per_second_and_peak_concurrency():
    a = record(0.55, [0.1] * 9, out=10, start=0.0)  # tokens at 0.55 .. 1.45 s
    b = record(0.15, [0.1] * 4, out=5, start=1.0)  # tokens at 1.15 .. 1.55 s
    c = record(0.1, [], out=1, start=3.0)  # alone at 3.1 s
    assert peak_output_tokens_per_s([a, b, c]) == 5 + 5  # second 1: a's 1.05..1.45 and all of b
    assert peak_concurrency([a, b, c]) == 2
    # half-open intervals: one ending as another starts is not overlap
    assert peak_concurrency([record(1.0, [], 1, 0.0), record(1.0, [], 1, 1.0)]) == 1


def test_sse_parser_joins_events_split_anywhere_and_skips_comments():
    stream = (
        b': ping\r\n\r\ndata: {"a": 1}\r\n\r\ndata: line one\ndata: line two\n\n'
        b'data:[DONE]\n\ndata: {"tail": true}'
    )
    for cut in range(1, len(stream)):
        p = SSEParser()
        events = p.feed(stream[:cut]) + p.feed(stream[cut:]) + p.close()
        assert events == ['{"a": 1}', "line one\nline two", "[DONE]", '{"tail": true}']


def test_bodies_and_what_counts_as_output_per_route():
    req = BenchRequest([5, 6], [{"role": "user", "content": "hi"}], 2, 7)
    comp = Endpoint("http://h/", "completions", "m", api_key="k")
    assert comp.url == "http://h/v1/completions" and comp.headers == {"Authorization": "Bearer k"}
    assert comp.body(req) == {"model": "m", "stream": True, "prompt": [5, 6], "max_tokens": 7,
                              "stream_options": {"include_usage": True}, "temperature": 0.0,
                              "ignore_eos": True}  # fmt: skip
    assert comp.output_of({"choices": [{"text": ""}]}) == ""
    assert comp.output_of({"choices": [], "usage": {}}) is None
    chat = Endpoint(
        "http://h", "chat", "m", ignore_eos=False, temperature=None, extra_body={"n": 1}
    )
    body = chat.body(req)
    assert body["messages"] == req.messages and body["max_completion_tokens"] == 7
    assert "ignore_eos" not in body and "temperature" not in body and body["n"] == 1
    # the opening role delta and the closing finish_reason delta carry no output
    assert chat.output_of({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) is None
    assert chat.output_of({"choices": [{"delta": {}, "finish_reason": "length"}]}) is None
    assert chat.output_of({"choices": [{"delta": {"reasoning_content": "hm"}}]}) == "hm"
    assert chat.output_of({"choices": [{"delta": {"content": "x"}}]}) == "x"


def test_poisson_arrivals_have_the_rate_asked_for_and_burstiness_shapes_the_gaps():
    times = serve_client.arrival_offsets(4000, rate=5.0, burstiness=1.0, seed=42)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.05)
    # exponential gaps: standard deviation equal to the mean
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.08)
    even = serve_client.arrival_offsets(4000, rate=5.0, burstiness=4.0, seed=42)
    gaps4 = [b - a for a, b in zip([0.0, *even], even)]
    assert statistics.mean(gaps4) == pytest.approx(0.2, rel=0.05)
    assert statistics.stdev(gaps4) / statistics.mean(gaps4) == pytest.approx(0.5, rel=0.08)
    assert times == serve_client.arrival_offsets(4000, 5.0, 1.0, seed=42)
    assert serve_client.arrival_offsets(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        serve_client.arrival_offsets(3, 0.0, 1.0, 0)


def test_run_load_keeps_at_most_n_in_flight_and_sends_at_the_arrival_times():
    state = {"now": 0, "most": 0, "starts": []}

    async def fake_send(req):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        state["starts"].append(time.perf_counter())
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return record(0.01, [0.01], out=2)

    reqs = [BenchRequest([1], None, 1, 2)] * 12
    records, duration = asyncio.run(serve_client.run_load(fake_send, reqs, max_concurrency=3))
    assert len(records) == 12 and state["most"] == 3
    assert duration >= 4 * 0.02
    state.update(most=0, starts=[])
    t0 = time.perf_counter()
    asyncio.run(serve_client.run_load(fake_send, reqs[:5], None, rate=20.0, seed=1))
    want = serve_client.arrival_offsets(5, 20.0, 1.0, 1)
    got = [s - t0 for s in state["starts"]]
    assert all(g >= w - 0.005 for g, w in zip(got, want)) and got[-1] < want[-1] + 0.5


@pytest.fixture(scope="module")
def tok():
    return serve_data.load_tokenizer("qwen35-tiny")


def test_random_prompts_have_exact_token_counts_as_ids_and_as_text(
    tok,
):
    special = set(tok.all_special_ids)
    for route, as_text in (("completions", False), ("completions", True), ("chat", True)):
        reqs, inexact = serve_data.random_requests(tok, 6, 63, 9, "s", route, as_text)
        assert inexact == 0 and len(reqs) == 6
        for r in reqs:
            assert r.prompt_len == 63 and r.output_len == 9
            if route == "chat":
                (msg,) = r.messages
                assert len(tok.encode(msg["content"], add_special_tokens=False)) == 63
            elif as_text:
                assert len(tok.encode(r.prompt, add_special_tokens=False)) == 63
            else:
                assert len(r.prompt) == 63 and not special & set(r.prompt)
        prompts = [str(r.prompt or r.messages) for r in reqs]
        assert len(set(prompts)) == 6
    again, _ = serve_data.random_requests(tok, 6, 63, 9, "s", "completions", False)
    other, _ = serve_data.random_requests(tok, 6, 63, 9, "t", "completions", False)
    first, _ = serve_data.random_requests(tok, 6, 63, 9, "s", "completions", False)
    assert again == first and other != first


def test_chat_dataset_reads_both_shapes_and_gives_each_run_its_own_prompts(tmp_path, tok):
    rows = [
        {"messages": [{"role": "system", "content": "Be terse."},
                      {"role": "user", "content": "Name three colours."},
                      {"role": "assistant", "content": "Red, green and blue."}]},
        {"conversations": [{"from": "human", "value": "Two plus two?"},
                           {"from": "gpt", "value": "Four."},
                           {"from": "human", "value": "And three?"}]},
        {"messages": [{"role": "user", "content": "A haiku about the sea."}]},
        {"conversations": [{"from": "gpt", "value": "no user turn: skipped"}]},
        {"messages": [{"role": "user", "content": "word " * 3000}]},  # too long: skipped
    ]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = serve_data.ChatDataset(path, tok, "chat", None, max_len=2048, seed=0)
    got = ds.take(2) + ds.take(1)
    assert not ds.reused
    firsts = sorted(r.messages[-1]["content"] for r in got)
    assert firsts == ["A haiku about the sea.", "Name three colours.", "Two plus two?"]
    by_first = {r.messages[-1]["content"]: r for r in got}
    colours = by_first["Name three colours."]
    assert [m["role"] for m in colours.messages] == ["system", "user"]
    assert colours.output_len == len(tok.encode("Red, green and blue."))
    assert by_first["A haiku about the sea."].output_len == serve_data.DEFAULT_OUTPUT_LEN
    assert by_first["Two plus two?"].messages == [{"role": "user", "content": "Two plus two?"}]
    ds.take(1)
    assert ds.reused
    # to /v1/completions: the chat template rendered here, as text
    (comp,) = serve_data.ChatDataset(path, tok, "completions", 5, 2048, seed=0).take(1)
    assert comp.prompt.startswith("<|im_start|>") and comp.output_len == 5
    assert comp.prompt_len == len(tok.encode(comp.prompt, add_special_tokens=False))
    (path := tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ValueError, match="neither a 'messages' nor a 'conversations'"):
        serve_data.read_conversations(path)


class StubServer(BaseHTTPRequestHandler):
    """Streams max_tokens chunks, the first after FIRST s and the others GAP s apart, then
    usage. The prompt's first token picks a failure: 13 an error event after one token, 14 an
    HTTP 500, 15 no usage (the client counts the text)."""

    FIRST, GAP = 0.08, 0.02

    def do_GET(self):
        self._send(200, {"data": [{"id": "stub-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        first = 0 if chat else body["prompt"][0]
        if first == 14:
            return self._send(500, {"error": {"message": "boom"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if chat:
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        time.sleep(self.FIRST)
        n = body.get("max_tokens") or body.get("max_completion_tokens")
        for i in range(n):
            if i:
                time.sleep(self.GAP)
            piece = {"delta": {"content": "ab "}} if chat else {"text": "ab "}
            self._event({"choices": [{"index": 0, "finish_reason": None, **piece}]})
            if first == 13:
                return self._event({"error": {"message": "no replica left", "code": 503}})
        if chat:
            self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if first != 15:
            usage = {"prompt_tokens": 1000 + len(body.get("prompt") or []), "completion_tokens": n}
            self._event({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload):
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def send_all(url, route, reqs, count=None):
    async def go():
        async with serve_client.session(30) as http:
            ep = Endpoint(url, route, "stub-model")
            return [await serve_client.send(http, ep, r, count) for r in reqs]

    return asyncio.run(go())


def test_send_times_the_first_and_following_chunks_and_reads_usage(stub_url):
    (ok,) = send_all(stub_url, "completions", [BenchRequest([20, 21], None, 2, 5)])
    assert ok.success and ok.output_tokens == 5 and ok.prompt_len == 1002
    # lower bounds: the stub's own delays; upper ones only against absurd values, loose
    # enough for a loaded 2-core host (a 0.5 s bound failed once beside a training run)
    assert StubServer.FIRST <= ok.ttft < StubServer.FIRST + 3
    # one gap per chunk after the first; a chunk read late shortens the gap after it (one of
    # 20 ms came out at 15.5 ms after a 26.5 ms one), so only their sum is bounded below: the
    # stub's four sleeps, less a late read of the first chunk
    assert len(ok.itl) == 4 and all(0 < g < 3 for g in ok.itl)
    assert sum(ok.itl) >= 4 * StubServer.GAP * 0.75
    assert ok.latency == pytest.approx(ok.ttft + sum(ok.itl))
    assert ok.generated_text == "ab " * 5 and ok.output_tokens_source == "usage"
    # chat: the role delta sent at once is not the first token, nor is the finish delta one
    (chat,) = send_all(stub_url, "chat", [BenchRequest(None, [{"role": "user"}], 1, 3)])
    assert chat.success and chat.ttft >= StubServer.FIRST and len(chat.itl) == 2


def test_failures_are_recorded_and_a_missing_usage_is_counted_from_the_text(stub_url):
    reqs = [BenchRequest([t], None, 1, 3) for t in (13, 14, 15)]
    error, http500, no_usage = send_all(stub_url, "completions", reqs, count=lambda s: len(s))
    assert not error.success and error.error.startswith("error event:")
    assert not http500.success and http500.error.startswith("HTTP 500")
    assert no_usage.success and no_usage.output_tokens == len("ab " * 3)
    assert no_usage.output_tokens_source == "tokenizer" and no_usage.prompt_len == 1
    (down,) = send_all("http://127.0.0.1:9", "completions", reqs[:1])
    assert not down.success and "Connect" in down.error


def test_a_sweep_writes_vllms_fields_per_run(stub_url, tmp_path):
    out = tmp_path / "serving-stub.json"
    rc = serve.main(["--base-url", stub_url, "--tokenizer", "qwen35-tiny", "--num-prompts", "4",
                     "--input-len", "16", "--output-len", "3", "--concurrency", "1", "4",
                     "--goodput", "ttft:1000", "--out", str(out), "--notes", "stub"])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model_id"] == "stub-model" and report["notes"] == "stub"
    assert report["machine"]["commit"] and isinstance(report["worktree_changes"], list)
    assert [r["max_concurrency"] for r in report["runs"]] == [1, 4]
    vllm_names = {
        "date",
        "endpoint_type",
        "backend",
        "label",
        "model_id",
        "tokenizer_id",
        "num_prompts",
        "request_rate",
        "burstiness",
        "max_concurrency",
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
    }
    vllm_names |= {f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99")
                   for m in ("ttft", "tpot", "itl", "e2el")}  # fmt: skip
    for run in report["runs"]:
        assert vllm_names <= set(run)
        assert (run["completed"], run["total_output_tokens"]) == (4, 12)
        assert run["request_rate"] == "inf" and run["request_goodput"] is not None
    assert report["runs"][1]["max_concurrent_requests"] == 4
    table = serve_report.markdown_table(report).splitlines()
    assert len(table) == 4 and table[2].startswith("| concurrency 1 | 4/4 |")


def test_the_plot_is_drawn_beside_the_json(stub_url, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the [bench] extra")
    out = tmp_path / "serving-stub.json"
    serve.main(["--base-url", stub_url, "--tokenizer", "qwen35-tiny", "--num-prompts", "2",
                "--input-len", "8", "--output-len", "2", "--request-rate", "50", "100",
                "--num-warmups", "0", "--out", str(out), "--plot"])  # fmt: skip
    assert out.with_suffix(".png").stat().st_size > 10_000
    runs = json.loads(out.read_text())["runs"]
    assert serve_report.load_axis(runs) == ("request rate (req/s, offered)", [50.0, 100.0])
