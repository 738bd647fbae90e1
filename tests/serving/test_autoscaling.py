"""Issue 17's autoscaling acceptance: the app of deployments/qwen35-pd-autoscale.yaml on a real
local Ray cluster of 2 logical CPUs, over HTTP.

A prefill-heavy phase (long prompts, max_tokens 1, which finish on the prefill pool) raises the
prefill pool above its minimum while the decode pool stays at its own; a decode-heavy phase
(short prompts, prefilled on the decode pool, with long decodes) does the reverse; idle, both
return to their minimum; not one request fails. Replica counts come from serve.status(), the
decisions' reasons from the controller log and autoscaling_samples().
"""

import glob
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

import pytest
import ray
import yaml
from http_helpers import client, prompt_ids
from ray import cloudpickle, serve
from serve_fixtures import running_apps

from qwen35_ray.serving import builder, disagg
from qwen35_ray.serving.autoscaling import autoscaling_samples
from qwen35_ray.serving.autoscaling_signals import AutoscalingSignals

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = "qwen35"
POOLS = ("PrefillServer", "DecodeServer")
MINIMUM = {"PrefillServer": 1, "DecodeServer": 1}
# a phase's load runs until its pool has scaled up, within this long
SCALE_UP_WITHIN_S = 120
SCALE_DOWN_WITHIN_S = 90


@pytest.fixture
def pools_with_signals(monkeypatch):
    """The pools' classes as they report autoscaling signals. Until LLMServer mixes in
    AutoscalingSignals, subclasses here that do. What this module defines reaches the replicas
    pickled by value (they cannot import a test module)."""
    if not issubclass(disagg.PrefillServer, AutoscalingSignals):

        class PrefillServer(AutoscalingSignals, disagg.PrefillServer):
            pass

        class DecodeServer(AutoscalingSignals, disagg.DecodeServer):
            pass

        monkeypatch.setattr(builder, "PrefillServer", PrefillServer)
        monkeypatch.setattr(builder, "DecodeServer", DecodeServer)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@serve.deployment(ray_actor_options={"num_cpus": 0})
class MetricsProbe:
    """What the ingress's /metrics gets from autoscaling_samples, asked from inside a replica."""

    async def samples(self, app: str) -> list:
        return await autoscaling_samples(app)

    def __call__(self, request) -> str:  # its /health, for running_apps
        return "ok"


class Replicas:
    """serve.status() of both pools every half second: replicas not stopping, per pool."""

    def __init__(self):
        self.log: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> dict[str, int]:
        deployments = serve.status().applications[APP].deployments
        return {
            pool: sum(n for s, n in deployments[pool].replica_states.items() if s != "STOPPING")
            for pool in POOLS
        }

    def _run(self):
        while not self._stop.is_set():
            self.log.append((time.monotonic(), self.now()))
            self._stop.wait(0.5)

    def most(self, pool: str, since: float) -> int:
        return max(n[pool] for t, n in self.log if t >= since)

    def wait(self, done, within: float, what: str):
        deadline = time.monotonic() + within
        while not done(self.now()):
            assert time.monotonic() < deadline, f"{what} within {within:.0f} s; saw {self.now()}"
            time.sleep(0.5)

    def stop(self):
        self._stop.set()
        self._thread.join()


class Load:
    """`workers` clients sending one request after another until stopped; every failure kept."""

    def __init__(self, url: str, workers: int, request):
        self.stop, self.done, self.failures = threading.Event(), count(), []
        self._pool = ThreadPoolExecutor(workers)
        seeds = count(1000 * workers)
        oai = client(url, timeout=300)
        self._futures = [self._pool.submit(self._loop, oai, request, seeds) for _ in range(workers)]

    def _loop(self, oai, request, seeds):
        while not self.stop.is_set():
            try:
                request(oai, next(seeds))
                next(self.done)
            except Exception as e:
                self.failures.append(repr(e))

    def finish(self) -> int:
        self.stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()
        return next(self.done)


def long_prompt(oai, seed: int):
    out = oai.completions.create(model="qwen35-tiny", prompt=prompt_ids(1500, seed), max_tokens=1)
    assert out.usage.completion_tokens == 1


def long_decode(oai, seed: int):
    out = oai.completions.create(
        model="qwen35-tiny",
        prompt=prompt_ids(8, seed),
        max_tokens=200,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 200 and out.choices[0].finish_reason == "length"


def phase(url: str, replicas: Replicas, workers: int, request, pool: str) -> tuple[float, ...]:
    """Load until `pool` runs two replicas (and a few seconds more), then wait for the requests
    in flight. (start, seconds until it scaled up, requests done)."""
    start = time.monotonic()
    load = Load(url, workers, request)
    try:
        replicas.wait(lambda n: n[pool] >= 2, SCALE_UP_WITHIN_S, f"{pool} scaled up")
        up = time.monotonic() - start
        time.sleep(3)
    finally:
        done = load.finish()
    assert load.failures == [], load.failures[:3]
    return start, up, done


def idle(replicas: Replicas, want: dict[str, int], what: str) -> float:
    """Seconds until the pools are back to `want` replicas, no load."""
    start = time.monotonic()
    replicas.wait(lambda n: all(n[p] == k for p, k in want.items()), SCALE_DOWN_WITHIN_S, what)
    return time.monotonic() - start


def test_each_pool_scales_on_its_own_load_and_back(pools_with_signals):
    (app,) = yaml.safe_load((ROOT / "deployments" / "qwen35-pd-autoscale.yaml").read_text())[
        "applications"
    ]
    t0 = time.monotonic()
    apps = {APP: ("/", builder.build_pd_app(app["args"])), "probe": ("/probe", MetricsProbe.bind())}
    with running_apps(apps, num_cpus=2) as url:
        logs = ray._private.worker._global_node.get_logs_dir_path()
        replicas = Replicas()
        try:
            assert replicas.now() == MINIMUM
            started = time.monotonic()

            start, prefill_up, prompts = phase(url, replicas, 8, long_prompt, "PrefillServer")
            assert replicas.most("DecodeServer", since=start) == 1
            prefill_down = idle(replicas, {"PrefillServer": 1}, "prefill pool back to 1")

            start, decode_up, decodes = phase(url, replicas, 16, long_decode, "DecodeServer")
            assert replicas.most("PrefillServer", since=start) == 1
            decode_down = idle(replicas, MINIMUM, "both pools back to their minimum")
            samples = serve.get_app_handle("probe").samples.remote(APP).result()
        finally:
            replicas.stop()
        controller_log = "".join(
            Path(f).read_text() for f in glob.glob(f"{logs}/serve/controller_*.log")
        )
    print(
        f"\napp up in {started - t0:.0f} s; prefill phase: {prompts} requests, 2 replicas after "
        f"{prefill_up:.0f} s, back to 1 {prefill_down:.0f} s after the load; decode phase: "
        f"{decodes} requests, 2 replicas after {decode_up:.0f} s, back to 1 {decode_down:.0f} s "
        "after the load"
    )
    assert prompts > 0 and decodes > 0
    # each decision with its reason in the controller log
    for line in (
        "PrefillServer prefill_policy: 1 -> 2: TTFT estimate",
        "PrefillServer prefill_policy: 2 -> 1: low for",
        "DecodeServer decode_policy: 1 -> 2: occupancy",
        "DecodeServer decode_policy: 2 -> 1: low for",
    ):
        assert line in controller_log
    # and in the samples /metrics shows
    by_name = {(name, labels.get("pool")): value for name, labels, value in samples}
    for pool in POOLS:
        assert by_name[("autoscaling_scale_ups_total", pool)] >= 1
        assert by_name[("autoscaling_scale_downs_total", pool)] >= 1
        assert by_name[("autoscaling_target_replicas", pool)] == 1
    assert ("serve_replicas", {"pool": "PrefillServer", "state": "RUNNING"}, 1) in samples
