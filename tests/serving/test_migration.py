"""Request migration over real HTTP with the `openai` client, on one local Ray cluster: streams
whose replica is killed mid-run go on elsewhere, and each text equals the uninterrupted offline
run's.

Three apps on the embedded tiny checkpoint (float32): the disaggregated app at /pd (1 prefill,
2 decode replicas), the collocated app at /co (2 replicas), and a collocated app at /off with
migration_limit 0 (1 replica).

How the streams come to share the replica that is killed: Serve's routers spread concurrent
streams over both replicas, so the test first kills the other replica of the pool and waits
for Serve to start its replacement; the streams then start while that replacement loads the
model, when one replica is running. /metrics shows it: every stream migrates exactly once, and
on /pd, the killed replica is the one the decode counters name for all of them.

When to kill is read from the replica's engine, not from the client's events: those are
chunks of every token a stream made in stream_interval_s (0.05 s), so 50 events can hold a
whole 200-token stream (a clean-clone CI run killed the replica at the 50th event of each
stream, after three of them had ended there).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from http_helpers import by_label, growth, metrics, prompt_ids, total
from serve_fixtures import running_apps
from serve_streams import Streams, engine_stats, kill, offline_run, replicas, wait_for

from qwen35_ray.serving.builder import build_app, build_pd_app

# slow tier (.ci/run): a Ray cluster whose replicas are killed under streams
pytestmark = pytest.mark.slow

MODEL = "qwen35-tiny"
MIN_PREFILL = 16
ENGINE = {"max_num_seqs": 16, "max_model_len": 2048, "kv_cache_memory_bytes": 2**25}
# tokens the replica's engine has generated per stream (on average) when it is killed
KILL_AT = 50
# an answer of 40 three-digit numbers: about 160 tokens (digits are tokens of their own), so
# the grammar is mid-way when the replica dies
NUMBERS = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 100, "maximum": 999},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
LONG = dict(max_tokens=200, extra_body={"ignore_eos": True})
SCHEMA = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": NUMBERS}}
# (prompt ids, request kwargs): four greedy streams, with long prompts (prefilled on the
# prefill pool in /pd) and short ones (prefilled on the decode replica), one with logprobs;
# two of seeded sampling; one constrained by a JSON schema. Every request names its seed, so
# the offline run can repeat it.
JOBS = [
    (prompt_ids(40, 100), dict(temperature=0, seed=1, logprobs=2, **LONG)),
    (prompt_ids(60, 101), dict(temperature=0, seed=2, **LONG)),
    (prompt_ids(8, 102), dict(temperature=0, seed=3, **LONG)),
    (prompt_ids(12, 103), dict(temperature=0, seed=4, **LONG)),
    (prompt_ids(30, 104), dict(temperature=0.8, seed=5, **LONG)),
    (prompt_ids(10, 105), dict(temperature=0.8, seed=6, **LONG)),
    (
        prompt_ids(20, 106),
        dict(temperature=0.8, seed=7, max_tokens=400, extra_body={"response_format": SCHEMA}),
    ),
]


@pytest.fixture(scope="module")
def cluster():
    """The apps, and the offline reference computed while they start."""
    common = {"model": MODEL, "dtype": "float32", "engine": ENGINE, "ingress": {"num_cpus": 0.1}}
    pd = build_pd_app(
        {
            **common,
            "disaggregation": {"min_prefill_tokens": MIN_PREFILL},
            "prefill_server": {"num_cpus": 0.1},
            "decode_server": {"num_replicas": 2, "num_cpus": 0.1},
        }
    )
    co = build_app({**common, "llm_server": {"num_replicas": 2, "num_cpus": 0.1}})
    off = build_app({**common, "migration_limit": 0, "llm_server": {"num_cpus": 0.1}})
    apps = {"pd": ("/pd", pd), "co": ("/co", co), "off": ("/off", off)}
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(offline_run, MODEL, ENGINE, JOBS)
        with running_apps(apps, num_cpus=8) as url:
            yield url, reference.result()


def kill_under_streams(url: str, app: str, deployment: str, requests) -> tuple[list, dict, str]:
    """Leave one running replica of the pool (see the module docstring), start the streams on
    it, kill it once every stream has output at the client and its engine has generated
    KILL_AT tokens per stream, all still running. Returns the results, the /metrics deltas,
    and the killed replica's id."""
    base = f"{url}/{app}"
    names = replicas(app, deployment)
    assert len(names) == 2, names
    other, victim = sorted(names)
    kill(other)
    # Serve has noticed: the replacement exists (it loads the model for a few seconds)
    wait_for(
        lambda: other not in replicas(app, deployment) and len(replicas(app, deployment)) == 2,
        60,
        "the replacement of the first killed replica",
    )
    before = metrics(base)
    start = engine_stats(victim)["generation_tokens_total"]
    streams = Streams(base, MODEL, requests)
    n = len(requests)
    # output sent: a stream lost now resumes (before any output it would be retried instead)
    wait_for(lambda: min(streams.progress) >= 1, 240, "output on every stream")
    wait_for(
        lambda: engine_stats(victim)["generation_tokens_total"] - start >= n * KILL_AT,
        240,
        f"{KILL_AT} tokens per stream on the replica",
    )
    running = engine_stats(victim)["running"]
    assert running == n, f"only {running} of the {n} streams still ran on the replica"
    kill(victim)
    results = streams.join()
    after = metrics(base)
    served = "qwen35_ray_decode_replica_requests_total"
    d = growth(before, after)
    # what each decode replica served meanwhile, as "<name>/<replica id>"
    was = by_label(before, served, "decode_replica")
    for r, n in by_label(after, served, "decode_replica").items():
        d[f"{served}/{r}"] = n - was.get(r, 0)
    return results, d, victim.rsplit("#", 1)[1]


def check(results: list, want: list) -> None:
    for i, (got, (text, reason, lps)) in enumerate(zip(results, want)):
        assert not isinstance(got, Exception), f"stream {i} failed: {got}"
        assert got[0] == text, f"stream {i}: its text differs from the offline run's"
        assert got[1] == reason
        assert [t for t, _ in got[2]] == [t for t, _ in lps]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got[2], lps))
    # the constrained answer still validates (and equals the offline one, above)
    jsonschema.validate(json.loads(results[-1][0]), NUMBERS)
    assert len(results[0][2]) == 200


def test_disaggregated_streams_migrate_off_a_killed_decode_replica(cluster):
    """Greedy (moved from the prefill pool, and prefilled on the decode replica), seeded and
    JSON-schema streams: the decode replica serving all of them dies after about 50 tokens
    each; each resumes on the other decode replica, re-prefilled from its prompt and the
    tokens sent."""
    url, reference = cluster
    results, d, victim = kill_under_streams(url, "pd", "DecodeServer", JOBS)
    check(results, reference)
    n = len(results)
    assert d[f"qwen35_ray_decode_replica_requests_total/{victim}"] == n
    assert d["qwen35_ray_migrations_total"] == n, "each stream resumes once, on a live replica"
    assert d["qwen35_ray_migration_failures_total"] == 0


def test_collocated_streams_migrate_off_a_killed_replica(cluster):
    url, reference = cluster
    results, d, _ = kill_under_streams(url, "co", "LLMServer", JOBS)
    check(results, reference)
    assert d["qwen35_ray_migrations_total"] == len(results)
    assert d["qwen35_ray_migration_failures_total"] == 0


def test_a_migration_limit_of_0_ends_the_streams_with_a_clean_503(cluster):
    url, _ = cluster
    base = url + "/off"
    (victim,) = replicas("off", "LLMServer")
    jobs = [(prompt_ids(20, k), dict(temperature=0, **LONG)) for k in range(2)]
    streams = Streams(base, MODEL, jobs)
    wait_for(lambda: min(streams.progress) >= 5, 120, "the streams' first tokens")
    kill(victim)
    for e in streams.join():
        assert isinstance(e, openai.APIError), e
        assert "the replica serving this request failed; retry the request" in str(e)
        assert "Traceback" not in str(e)
    assert total(metrics(base), "qwen35_ray_migration_failures_total") == 2
