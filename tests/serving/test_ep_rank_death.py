"""A rank of an expert-parallel replica dies: the replica goes at once, Serve starts a whole new
group, and no request hangs. Real local Ray Serve, real HTTP, the `openai` client.

The collocated app on the tiny MoE checkpoint, one replica of 2 rank actors. A rank is killed
the way a crash kills it (SIGKILL of its process), once while the group is idle (found by the
replica's health check) and once while streams run on it (found by the step in flight).
"""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import ray
from serve_fixtures import running_app

from qwen35_ray.serving.config import EP_HEALTH_CHECK_PERIOD_S

# slow tier (.ci/run): expert-parallel groups whose ranks are killed and rebuilt
pytestmark = pytest.mark.slow

MODEL = "qwen35-tiny"
# a dead rank is seen within one health-check period, the replica exits a second later, and
# Serve sees it gone at its next check: the replica must be gone well within this
GONE_WITHIN_S = 5 * EP_HEALTH_CHECK_PERIOD_S + 2
# a new group (replica, 2 ranks, the model loaded on each) serving on a 2-core machine
REPLACED_WITHIN_S = 120


@pytest.fixture(scope="module")
def url():
    args = {
        "model": MODEL,
        "dtype": "float32",
        "engine": {
            "max_num_seqs": 4,
            "max_model_len": 1024,
            "kv_cache_memory_bytes": 2**24,
            "expert_parallel_size": 2,
            "rank_num_cpus": 1,
        },
        "llm_server": {"num_cpus": 0.1},
        "ingress": {"num_cpus": 0.1},
    }
    with running_app(args) as base:
        yield base


def client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


def complete(url: str, max_tokens: int = 4) -> str:
    r = client(url).completions.create(
        model=MODEL, prompt=list(range(10, 40)), temperature=0, max_tokens=max_tokens
    )
    return r.choices[0].finish_reason


def alive(class_name: str) -> dict[str, int]:
    """Actor id -> process id of the live actors whose class name contains class_name."""
    return {
        actor_id: a["Pid"]
        for actor_id, a in ray._private.state.actors().items()
        if class_name in a["ActorClassName"] and a["State"] == "ALIVE"
    }


def kill_a_rank() -> tuple[dict, dict]:
    """SIGKILL rank actor process; returns the replicas and ranks alive before."""
    replicas, ranks = alive("LLMServer"), alive("RankWorker")
    assert len(replicas) == 1 and len(ranks) == 2, (replicas, ranks)
    os.kill(next(iter(ranks.values())), signal.SIGKILL)
    return replicas, ranks


def wait_gone(replicas: dict, ranks: dict) -> float:
    """Seconds until the replica and both its ranks are dead."""
    start = time.monotonic()
    while set(replicas) & set(alive("LLMServer")) or set(ranks) & set(alive("RankWorker")):
        assert time.monotonic() - start < GONE_WITHIN_S, "the broken group is still alive"
        time.sleep(0.2)
    return time.monotonic() - start


def wait_served(url: str) -> float:
    """Seconds until a request succeeds again (on a new group)."""
    start = time.monotonic()
    while True:
        try:
            assert complete(url) in ("stop", "length")
            return time.monotonic() - start
        except openai.APIError:
            assert time.monotonic() - start < REPLACED_WITHIN_S, "no new group serves"
            time.sleep(1)


def test_an_idle_rank_dies_and_a_new_group_serves(url):
    assert complete(url) in ("stop", "length")
    replicas, ranks = kill_a_rank()
    gone = wait_gone(replicas, ranks)
    assert gone < GONE_WITHIN_S
    wait_served(url)
    new_ranks = alive("RankWorker")
    assert len(new_ranks) == 2 and not set(new_ranks) & set(ranks)
    assert len(alive("LLMServer")) == 1


def test_a_rank_dies_under_streams_and_they_resume_on_the_new_group(url):
    """The dead group's streams are resumed (migration) on the group Serve starts in its
    place, and each text is what an uninterrupted request gives: none repeated or missing."""
    wait_served(url)
    c = client(url, timeout=REPLACED_WITHIN_S)
    progress = [0] * 4
    texts = [""] * 4
    results: list = [None] * 4
    prompts = [list(range(20 + i, 60 + i)) for i in range(4)]
    kw = dict(model=MODEL, temperature=0, max_tokens=200, extra_body={"ignore_eos": True})

    def stream(i):
        try:
            for ev in c.completions.create(prompt=prompts[i], stream=True, **kw):
                progress[i] += len(ev.choices)
                texts[i] += "".join(ch.text for ch in ev.choices)
            results[i] = "done"
        except openai.APIError as e:
            results[i] = e

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        deadline = time.time() + 60
        while min(progress) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert min(progress) >= 3, "the streams did not start"
        replicas, ranks = kill_a_rank()
        wait_gone(replicas, ranks)
        for f in futures:
            # bounded: a new group starts and the resumed streams finish within this
            f.result(timeout=REPLACED_WITHIN_S + 60)
    assert results == ["done"] * 4, results
    for i in range(4):
        whole = c.completions.create(prompt=prompts[i], **kw).choices[0].text
        assert texts[i] == whole
