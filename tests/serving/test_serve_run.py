"""The README's main job: `serve run deployments/qwen35.yaml`, run as the README writes it (in
Serve's high-throughput mode, serving/serve_mode.py), answers a chat request on CPU within 60 s
of starting, on the embedded tiny checkpoint; so does the disaggregated
`deployments/qwen35-pd.yaml`, moving the request from its prefill to its decode replica; and
so does the collocated app on Serve's own proxy (`serve run` without those variables)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from http_helpers import parse, total
from serve_fixtures import readme_serve_run

from qwen35_ray.serving.serve_mode import FAST_SERVE_ENV

# slow tier (.ci/run): `serve run` of each shipped YAML in a fresh Ray
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


LONG = "Write a short poem about the sea, the wind and the gulls, in four lines. " * 3


@pytest.mark.parametrize(
    "yaml, mode",
    [("qwen35.yaml", "readme"), ("qwen35-pd.yaml", "readme"), ("qwen35.yaml", "plain")],
)
def test_serve_run_answers_a_chat_request_within_60_s(tmp_path, yaml, mode):
    serve = Path(sys.executable).parent / "serve"
    env = {k: v for k, v in os.environ.items() if k not in FAST_SERVE_ENV}
    if mode == "readme":
        env.update(readme_serve_run()[0])
    env["QWEN35_RAY_CACHE"] = str(tmp_path / "cache")
    # the default, as on a fresh machine: the decode step compiles in the background from a
    # cold Inductor cache (it lives under QWEN35_RAY_CACHE) while the first requests run
    env.pop("QWEN35_RAY_COMPILE_DECODE", None)
    start = time.time()
    proc = subprocess.Popen(
        [str(serve), "run", f"deployments/{yaml}"],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        answer = None
        while time.time() - start < 60 and proc.poll() is None:
            try:
                r = requests.post(
                    "http://127.0.0.1:8000/v1/chat/completions",
                    timeout=10,
                    json={
                        "model": "qwen35-tiny",
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": LONG}],
                    },
                )
                if r.status_code == 200:
                    answer = r.json()
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        elapsed = time.time() - start
        log = (tmp_path / "serve.log").read_text()[-3000:]
        assert answer is not None, f"no answer after {elapsed:.0f} s; serve log tail:\n{log}"
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert elapsed < 60
        if yaml == "qwen35-pd.yaml":  # the prompt is past min_prefill_tokens: it moved
            text = requests.get("http://127.0.0.1:8000/metrics", timeout=10).text
            # every answered chat request moved its state; a first try that the client gave up
            # on while the app started (status 499) moved it or not, depending on when it left
            found = parse(text)
            route = "/v1/chat/completions"
            chats = total(found, "qwen35_ray_http_requests_total", route=route)
            answered = total(found, "qwen35_ray_http_requests_total", route=route, status="200")
            assert answered >= 1
            assert answered <= total(found, "qwen35_ray_transfers_total") <= chats, text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
