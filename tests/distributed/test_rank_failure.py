"""A rank that dies kills its engine at once and loudly, naming the rank; nothing hangs. A
group the cluster cannot place fails start-up, saying which resources were missing."""

import threading
import time

import pytest
import ray
from engine_fixtures import prompt

import qwen35_ray.distributed.group as group
from qwen35_ray.distributed.build import build_engine
from qwen35_ray.distributed.config import EPConfig
from qwen35_ray.engine.errors import EngineDead
from qwen35_ray.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


def in_thread(fn, timeout_s: float):
    """fn's exception (None if it returned), failing the test if it runs past timeout_s."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s} s"
    return box.get("error")


def test_a_killed_rank_fails_the_next_step_and_the_health_check(ray_cluster):
    engine = build_engine("qwen35-tiny", "float32", ep=EPConfig(2), max_model_len=512)
    try:
        for i in range(2):
            engine.add_request(f"r{i}", prompt(40, i, 1000), PARAMS)
        engine.step()
        engine.check_alive(timeout_s=10)
        ray.kill(engine.group.actors[1])
        # rank 0 may be left waiting in an all-to-all for rank 1: the step must not wait on it
        error = in_thread(lambda: [engine.step() for _ in range(5)], timeout_s=60)
        assert isinstance(error, EngineDead) and "rank 1" in str(error)
        error = in_thread(lambda: engine.check_alive(timeout_s=10), timeout_s=30)
        assert isinstance(error, EngineDead)
        # a dead engine stays dead
        with pytest.raises(EngineDead, match="rank 1"):
            engine.step()
    finally:
        engine.shutdown()


def test_health_check_names_the_dead_rank_between_steps(ray_cluster):
    engine = build_engine("qwen35-tiny", "float32", ep=EPConfig(2), max_model_len=512)
    try:
        ray.kill(engine.group.actors[0])
        # ray.kill only starts the kill: a ping sent at once may still be answered
        deadline = time.monotonic() + 10
        with pytest.raises(EngineDead, match="rank 0"):
            while time.monotonic() < deadline:
                engine.check_alive(timeout_s=2)
                time.sleep(0.1)
    finally:
        engine.shutdown()


def test_a_group_the_cluster_cannot_place_names_the_missing_resources(ray_cluster, monkeypatch):
    monkeypatch.setattr(group, "READY_TIMEOUT_S", 2.0)
    with pytest.raises(RuntimeError, match="rank_num_cpus=1000.0.*'CPU': ") as info:
        build_engine("qwen35-tiny", "float32", ep=EPConfig(2, num_cpus=1000.0), max_model_len=512)
    assert "STRICT_PACK" in str(info.value)
    # the placement group it asked for was removed, not left pending
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states and "REMOVED" in states
