"""streams.guarded's migration in isolation, over fake replica streams: a stream that loses its
replica after output resumes elsewhere from exactly what the client has, within
migration_limit. The real thing, replicas killed under streams, is in test_migration.py."""

import asyncio
from collections import Counter

import pytest
from fake_handles import Pool
from ray.exceptions import ActorDiedError

from qwen35_ray.serving.config import DisaggregationConfig
from qwen35_ray.serving.disagg import Disaggregator
from qwen35_ray.serving.errors import OpenAIError, Overloaded
from qwen35_ray.serving.streams import Migration, guarded

LOST = ActorDiedError()


def delta(tokens, text, logprobs=None, finish=None) -> dict:
    return {
        "outputs": [
            {
                "index": 0,
                "token_ids": tokens,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        ]
    }


def plan(*items):
    """A replica stream yielding items, raising the exceptions among them."""

    async def gen():
        for item in items:
            if isinstance(item, BaseException):
                raise item
            yield item

    return gen()


def run(stream) -> list:
    async def main():
        return [step async for step in stream]

    return asyncio.run(main())


class Resumes:
    """Migration.resume: the k-th call returns plans[k]; records what each was given."""

    def __init__(self, *plans):
        self.plans, self.given = list(plans), []

    def __call__(self, resume: dict):
        self.given.append(resume)
        return plan(*self.plans.pop(0))


def text_of(steps) -> str:
    return "".join(d["text"] for s in steps for d in s.get("outputs", ()))


def test_a_stream_lost_after_output_resumes_from_what_the_client_has():
    counters = Counter()
    first = plan(delta([1, 2], "ab", [{1: -0.1}, {2: -0.2}]), delta([3], "c", [{3: -0.3}]), LOST)
    resumes = Resumes([delta([4], "d", [{4: -0.4}], finish="length")])
    steps = run(guarded(lambda: first, 1, counters, migration=Migration(resumes, limit=3)))
    assert text_of(steps) == "abcd"
    assert resumes.given == [
        {"token_ids": [1, 2, 3], "logprobs": [{1: -0.1}, {2: -0.2}, {3: -0.3}], "text_chars": 3}
    ]
    assert counters["migrations_total"] == 1 and counters["replica_failures_total"] == 1
    assert counters["migration_failures_total"] == 0


def test_each_resume_counts_against_the_limit_then_a_clean_503():
    counters = Counter()
    resumes = Resumes([delta([2], "b"), LOST], [LOST])
    got = []

    async def main():
        stream = guarded(
            lambda: plan(delta([1], "a"), LOST),
            1,
            counters,
            role="decoding",
            migration=Migration(resumes, limit=2),
        )
        async for step in stream:
            got.append(step)

    with pytest.raises(OpenAIError) as e:
        asyncio.run(main())
    assert e.value.status == 503 and e.value.type == "service_unavailable"
    assert "replica decoding this request failed, and so did 2 resumes" in str(e.value)
    assert text_of(got) == "ab"
    # the second resume continued from the first resume's output too
    assert [r["token_ids"] for r in resumes.given] == [[1], [1, 2]]
    assert counters["migrations_total"] == 2 and counters["migration_failures_total"] == 1


def test_a_limit_of_0_is_the_plain_503():
    counters = Counter()
    resumes = Resumes()
    with pytest.raises(OpenAIError) as e:
        run(
            guarded(
                lambda: plan(delta([1], "a"), LOST), 1, counters, migration=Migration(resumes, 0)
            )
        )
    assert "the replica serving this request failed; retry the request" == str(e.value)
    assert resumes.given == [] and counters["migration_failures_total"] == 1


def test_a_resume_refused_by_a_full_replica_tries_another():
    full = Overloaded("the server is overloaded; retry later").as_item()
    resumes = Resumes([full], [delta([2], "b", finish="stop")])
    counters = Counter()
    steps = run(
        guarded(lambda: plan(delta([1], "a"), LOST), 0, counters, migration=Migration(resumes, 3))
    )
    assert text_of(steps) == "ab" and counters["migrations_total"] == 2
    # a refusal is no lost replica
    assert counters["replica_failures_total"] == 1


def test_a_full_replica_before_any_output_is_still_a_plain_503():
    full = Overloaded("the server is overloaded; retry later").as_item()
    resumes = Resumes()
    with pytest.raises(OpenAIError) as e:
        run(guarded(lambda: plan(full), 1, migration=Migration(resumes, 3)))
    assert e.value.status == 503 and "overloaded" in str(e.value) and resumes.given == []


def test_a_stream_lost_after_its_last_token_just_ends():
    resumes = Resumes()
    stream = plan(delta([1], "a", finish="stop"), LOST)
    steps = run(guarded(lambda: stream, 1, migration=Migration(resumes, 3)))
    assert text_of(steps) == "a" and resumes.given == []


def test_lost_before_output_is_retried_from_the_start_not_resumed():
    calls = iter([plan(LOST), plan(delta([1], "a", finish="stop"))])
    resumes = Resumes()
    counters = Counter()
    steps = run(guarded(lambda: next(calls), 1, counters, migration=Migration(resumes, 3)))
    assert text_of(steps) == "a" and resumes.given == [] and counters["retries_total"] == 1


def test_a_moved_request_resumes_after_the_prefill_token_on_a_decode_replica():
    """Disaggregated: the first token came from the prefill replica; the decode replica that
    imported the state dies after one more; the request is prefilled again on a decode
    replica (DecodeServer.generate) from the prompt and both tokens."""
    first = delta([7], "x")
    handoff = {"nbytes": 1, "wire_bytes": 1, "send_s": 0.0, "num_prompt_tokens": 30}
    calls = []

    async def prefill(ids, params, request_id, images=None):
        return {"step": first, "handoff": handoff, "replica": "p"}

    async def decode(h):
        yield {"admitted": True, "replica": "d1"}
        yield delta([8], "y")
        raise LOST

    async def generate(ids, params, request_id, resume, images=None):
        calls.append((len(ids), resume))
        yield {**delta([9], "z", finish="length"), "replica": "d2"}

    d = Disaggregator(
        Pool(prefill=prefill),
        Pool(decode=decode, generate=generate),
        DisaggregationConfig(min_prefill_tokens=1),
        migration_limit=3,
    )

    async def main():
        return [s async for s in d.generate(list(range(30)), {"n": 1})]

    steps = asyncio.run(main())
    assert text_of(steps) == "xyz"
    assert calls == [(30, {"token_ids": [7, 8], "logprobs": None, "text_chars": 2})]
    assert d.counters["migrations_total"] == 1 and d.decode_replicas == {"d1": 1, "d2": 1}


def test_n_above_1_is_not_migrated():
    async def generate(ids, params, request_id, resume=None, images=None):
        yield {"outputs": [{"index": 1, "token_ids": [1], "text": "a"}]}
        raise LOST

    d = Disaggregator(None, Pool(generate=generate), DisaggregationConfig(), migration_limit=3)

    async def main():
        return [s async for s in d.generate([1, 2], {"n": 2})]

    with pytest.raises(OpenAIError) as e:
        asyncio.run(main())
    assert e.value.status == 503 and d.counters["migrations_total"] == 0


def test_a_replica_whose_engine_died_is_lost_too():
    """Its EngineLost item (a 503 for a client) makes the ingress resume the stream elsewhere;
    a plain 503 item from a replica is passed on as the error it is."""
    from qwen35_ray.serving.errors import EngineLost

    counters = Counter()
    dead = EngineLost("this replica's engine failed; retry the request").as_item()
    first = plan(delta([1], "a"), dead)
    resumes = Resumes([delta([2], "b", finish="length")])
    steps = run(guarded(lambda: first, 1, counters, migration=Migration(resumes, limit=3)))
    assert text_of(steps) == "ab"
    assert resumes.given[0]["token_ids"] == [1]
    assert counters["migrations_total"] == 1
    full = Overloaded("the server is overloaded; retry later").as_item()
    with pytest.raises(OpenAIError) as e:
        run(guarded(lambda: plan(delta([1], "a"), full), 1, Counter(),
                    migration=Migration(Resumes(), limit=3)))  # fmt: skip
    assert e.value.status == 503
