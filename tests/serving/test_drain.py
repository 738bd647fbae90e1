"""Graceful drain: a replica Serve stops while it serves streams, over real HTTP with the
`openai` client on one local Ray cluster. None of the streams fails.

What Serve 2.60 does when it stops a replica (scale-down, redeploy): the controller takes it
out of the running set at once (routers stop sending it requests) and calls its
perform_graceful_shutdown, which waits, checking every graceful_shutdown_wait_loop_s, until it
has no ongoing requests; only then does the user class's __del__ run. The replica is not told
before that, so it cannot hand its streams over early. If its requests outlast
graceful_shutdown_timeout_s, the controller kills the actor (ray.kill), and the ingress sees
the stream's replica lost (ActorDiedError), which migrates the stream (streams.guarded).

Two collocated apps of 2 replicas each: /patient (graceful_shutdown_timeout_s 120: the stopped
replica finishes its streams) and /impatient (1 s: it is killed under them, and they migrate).
The test scales a pool down the way Serve's autoscaler does, by setting its target replica
count on the controller (the external scaler API, which needs external_scaler_enabled).
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from http_helpers import growth, metrics, prompt_ids
from ray import serve
from ray.serve._private.common import DeploymentID
from serve_fixtures import free_port
from serve_streams import Streams, engine_stats, offline_run, replicas, wait_for

from qwen35_ray.serving.builder import build_app
from qwen35_ray.serving.serve_mode import fast_serve_env

# slow tier (.ci/run): a Ray cluster whose replicas are stopped under streams
pytestmark = pytest.mark.slow

MODEL = "qwen35-tiny"
ENGINE = {"max_num_seqs": 8, "max_model_len": 1024, "kv_cache_memory_bytes": 2**24}
LONG = dict(max_tokens=200, extra_body={"ignore_eos": True})
IMPATIENT_JOBS = [
    (prompt_ids(20 + k, 500 + k), dict(temperature=0.8 if k % 2 else 0, seed=k, **LONG))
    for k in range(4)
]


def app(graceful_shutdown_timeout_s: float):
    return build_app(
        {
            "model": MODEL,
            "dtype": "float32",
            "engine": ENGINE,
            "ingress": {"num_cpus": 0.1},
            "llm_server": {
                "num_replicas": 2,
                "num_cpus": 0.1,
                # 4 streams over 2 replicas of at most 2 each: Serve's router, left to its
                # queue-length probes, once put all 4 on one replica under a loaded CI host
                "max_ongoing_requests": 2,
                "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
                "graceful_shutdown_wait_loop_s": 0.2,
            },
        }
    )


@pytest.fixture(scope="module")
def cluster():
    """Both apps, every replica running, and the offline reference of IMPATIENT_JOBS."""
    port = free_port()
    with fast_serve_env():  # the Serve mode users get
        ray.init(num_cpus=8, include_dashboard=False, logging_level="warning")
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(offline_run, MODEL, ENGINE, IMPATIENT_JOBS)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, timeout in (("patient", 120), ("impatient", 1)):
                serve.run(
                    app(timeout),
                    name=name,
                    route_prefix=f"/{name}",
                    blocking=False,
                    external_scaler_enabled=True,
                )
            wait_for(
                lambda: all(a.status == "RUNNING" for a in serve.status().applications.values()),
                240,
                "both apps running",
            )
            yield f"http://127.0.0.1:{port}", reference.result()
        finally:
            serve.shutdown()
            ray.shutdown()


def scale_down_under_streams(url: str, app_name: str, jobs: list):
    """Streams spread over both replicas, then the pool's target drops to 1: Serve stops one
    of them, which serves some of the streams. Returns the results, the stopped replica's
    streams when it was stopped, and the /metrics deltas."""
    base = f"{url}/{app_name}"
    names = replicas(app_name, "LLMServer")
    assert len(names) == 2
    before = metrics(base)
    streams = Streams(base, MODEL, jobs)
    wait_for(lambda: min(streams.progress) >= 5, 120, "5 tokens on every stream")
    held = {name: engine_stats(name)["running"] for name in names}
    assert all(held.values()), f"Serve's router left a replica idle: {held}"
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    ray.get(controller.update_deployment_replicas.remote(DeploymentID("LLMServer", app_name), 1))
    wait_for(lambda: len(replicas(app_name, "LLMServer")) == 1, 180, "the scale-down")
    (stopped,) = names - replicas(app_name, "LLMServer")
    results = streams.join()
    after = metrics(base)
    return results, held[stopped], growth(before, after)


def test_a_stopped_replica_finishes_its_streams_within_the_timeout(cluster):
    url, _ = cluster
    jobs = [(prompt_ids(20 + k, 400 + k), dict(temperature=0, max_tokens=60)) for k in range(4)]
    results, held, d = scale_down_under_streams(url, "patient", jobs)
    for r in results:
        assert not isinstance(r, Exception), r
        assert r[1] in ("stop", "length") and r[0]
    # they ended where they ran: none was cut off and moved
    assert held > 0 and d["qwen35_ray_migrations_total"] == 0
    # the pool goes on serving
    r = requests.post(
        f"{url}/patient/v1/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_streams_outlasting_the_timeout_migrate(cluster):
    url, reference = cluster
    t0 = time.time()
    results, held, d = scale_down_under_streams(url, "impatient", IMPATIENT_JOBS)
    for i, (got, (text, reason, _)) in enumerate(zip(results, reference)):
        assert not isinstance(got, Exception), f"stream {i} failed: {got}"
        assert (got[0], got[1]) == (text, reason), f"stream {i} differs from the offline run"
    # the stopped replica's streams each resumed once on the one left
    assert held > 0 and d["qwen35_ray_migrations_total"] == held
    assert d["qwen35_ray_migration_failures_total"] == 0
    assert time.time() - t0 < 240
