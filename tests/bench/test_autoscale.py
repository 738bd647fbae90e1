"""`qwen35-ray bench autoscale` without Ray: its phases' requests, its percentiles, the replica
counts it reads from /metrics, and the report it writes, against a stub SSE server."""

import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen35_ray.bench import autoscale
from qwen35_ray.serving.autoscale_watch import engine_pools, parse_decision, parse_metrics


def args(*argv):
    return autoscale.parser().parse_args(list(argv))


def test_phases_are_a_prefill_burst_then_long_decodes_of_short_prompts():
    prefill, decode = autoscale.phases(args())
    assert (prefill.name, prefill.max_tokens) == ("prefill", 1)
    assert prefill.prompt_tokens > 1000 and prefill.num_requests >= prefill.concurrency
    assert decode.name == "decode" and decode.max_tokens >= 100
    # under the autoscale app's min_prefill_tokens (32): prefilled on the decode pool
    assert decode.prompt_tokens < 32 and decode.num_requests >= decode.concurrency


def test_request_bodies_are_distinct_seeded_streamed_prompts_of_the_phase_size():
    phase = autoscale.Phase("prefill", 5, 2, 63, 1)
    bodies = autoscale.request_bodies(phase, "m", seed=42)
    assert len(bodies) == 5
    assert bodies == autoscale.request_bodies(phase, "m", seed=42)
    assert bodies != autoscale.request_bodies(phase, "m", seed=43)
    prompts = [tuple(b["prompt"]) for b in bodies]
    assert len(set(prompts)) == 5 and all(len(p) == 63 for p in prompts)
    assert all(autoscale.TOKEN_LO <= t < autoscale.TOKEN_HI for p in prompts for t in p)
    body = bodies[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["ignore_eos"], body["temperature"]) == (1, True, 0)


def test_percentiles_interpolate_between_ranks_and_say_none_for_no_values():
    out = autoscale.percentiles([float(x) for x in range(10, 0, -1)])
    assert out == {"n": 10, "p50": pytest.approx(5.5), "p90": pytest.approx(9.1), "mean": 5.5}
    assert autoscale.percentiles([2.0]) == {"n": 1, "p50": 2.0, "p90": 2.0, "mean": 2.0}
    assert autoscale.percentiles([]) == {"n": 0, "p50": None, "p90": None, "mean": None}


def test_replica_span_says_when_a_pool_first_ran_above_its_start():
    samples = [
        {"t": t, "running": {"P": p, "D": 1}} for t, p in ((0, 1), (1, 1), (2, 2), (3, 2), (9, 1))
    ]
    span = autoscale.replica_span(samples, 0.5, 3.5, {"P": 1, "D": 1})
    assert span["P"] == {
        "min": 1,
        "max": 2,
        "above_start_after_s": 1.5,
        "back_to_start_after_s": None,
    }
    assert span["D"]["above_start_after_s"] is None and span["D"]["max"] == 1
    # the idle after it begins with 2 running (the sample before it) and comes back at t=9
    idle = autoscale.replica_span(samples, 3.5, 10, {"P": 1, "D": 1})
    assert idle["P"]["back_to_start_after_s"] == 5.5 and idle["P"]["min"] == 1
    assert idle["D"]["back_to_start_after_s"] is None


def test_decisions_come_from_the_policies_log_lines_on_the_benchs_clock():
    t0 = datetime(2026, 11, 30, 16, 53, 40).timestamp()
    line = (
        "INFO 2026-11-30 16:53:43,106 controller 29871 -- PrefillServer prefill_policy: 1 -> 2: "
        "TTFT estimate 1.32 s vs ttft_target_s 0.5"
    )
    d = parse_decision(line, t0)
    assert d["pool"] == "PrefillServer" and d["t"] == pytest.approx(3.106)
    assert d["line"].startswith("controller 29871 -- PrefillServer prefill_policy: 1 -> 2:")
    assert parse_decision(line, t0 + 10) is None
    held = line.replace("1 -> 2:", "holding 1 (starting):")
    assert parse_decision(held, t0) is None


def test_metrics_give_replica_counts_and_the_policies_decisions_without_the_ingress():
    text = "\n".join(
        [
            "# TYPE qwen35_ray_serve_replicas gauge",
            'qwen35_ray_serve_replicas{pool="PrefillServer",state="RUNNING"} 2',
            'qwen35_ray_serve_replicas{pool="PrefillServer",state="STARTING"} 1',
            'qwen35_ray_serve_replicas{pool="DecodeServer",state="RUNNING"} 1',
            'qwen35_ray_serve_replicas{pool="DecodeServer",state="STOPPING"} 1',
            'qwen35_ray_autoscaling_desired_replicas{pool="PrefillServer"} 3',
            'qwen35_ray_autoscaling_decision{pool="PrefillServer",direction="up",code="ttft"} 1',
            "qwen35_ray_requests_total 7",
        ]
    )
    assert parse_metrics(text) == {
        "running": {"PrefillServer": 2, "DecodeServer": 1},
        "starting": {"PrefillServer": 1},
        "desired": {"PrefillServer": 3},
        "decision": {"PrefillServer": "up:ttft"},
    }
    assert engine_pools(["OpenAIIngress", "PrefillServer", "DecodeServer"]) == [
        "DecodeServer",
        "PrefillServer",
    ]


class StubApp(BaseHTTPRequestHandler):
    """/v1/models and streamed /v1/completions: one chunk per token, then usage; a prompt
    starting with token 13 gets an error event after its first token, as a replica lost past
    migration_limit would."""

    def do_GET(self):
        self._send(200, {"data": [{"id": "stub-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if body["prompt"][0] == 13:
                error = {"error": {"message": "no replica left", "code": 503}}
                self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
                return
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


class StillWatch:
    """A watch whose pools never change (no cluster)."""

    source = "stub"

    def __init__(self):
        self.t0 = time.monotonic()
        self.samples = [{"t": 0.0, "running": {"PrefillServer": 1, "DecodeServer": 1}}]

    def latest(self):
        return dict(self.samples[-1]["running"])

    def stop(self):
        return self.samples


@pytest.fixture
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubApp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_report_has_both_phases_their_idle_spans_latencies_and_no_failures(stub_url):
    a = args("--prefill-requests", "4", "--prefill-concurrency", "2", "--prefill-prompt-tokens",
             "40", "--decode-requests", "3", "--decode-concurrency", "3", "--decode-max-tokens",
             "5", "--idle-s", "1", "--idle-hold-s", "0")  # fmt: skip
    report = autoscale.run(a, stub_url, StillWatch())
    json.dumps(report)
    assert report["model"] == "stub-model" and report["failed"] == 0
    names = [p["name"] for p in report["phases"]]
    assert names == ["prefill", "idle after prefill", "decode", "idle after decode"]
    prefill, _, decode, idle = report["phases"]
    assert (prefill["requests"], prefill["failed"], prefill["completion_tokens"]) == (4, 0, 4)
    assert prefill["ttft_s"]["n"] == 4 and prefill["itl_s"]["n"] == 0
    assert decode["completion_tokens"] == 15 and decode["itl_s"]["n"] == 3 * 4
    assert decode["workload"] == {"name": "decode", "num_requests": 3, "concurrency": 3,
                                  "prompt_tokens": 8, "max_tokens": 5}  # fmt: skip
    assert idle["workload"] is None and idle["requests"] == 0
    assert decode["replicas"]["DecodeServer"]["above_start_after_s"] is None
    assert all(p["start_s"] <= p["end_s"] for p in report["phases"])
    table = autoscale.markdown_table(report).splitlines()
    assert len(table) == 2 + 4 and table[0].count("|") == table[-1].count("|")
    assert table[4].startswith("| decode | ") and table[4].endswith("| 1 | 1 |")


def test_an_error_event_or_a_short_stream_counts_as_a_failed_request(stub_url):
    body = {"model": "m", "prompt": [13, 20], "max_tokens": 3, "stream": True}
    failed = autoscale.stream_one(stub_url, body, "decode", 0.0, timeout=10)
    assert failed.error == "error event: no replica left" and failed.ttft is not None
    ok = autoscale.stream_one(stub_url, {**body, "prompt": [14]}, "decode", 0.0, timeout=10)
    assert ok.error is None and ok.completion_tokens == 3 and len(ok.itls) == 2
    down = autoscale.stream_one("http://127.0.0.1:9", body, "decode", 0.0, timeout=2)
    assert down.error.startswith("ConnectionError")
