"""The Disaggregator's failure handling in isolation: a stream whose replica dies before any
output runs again elsewhere; one that dies after output ends with a clean 503. The real thing,
a replica killed under load, is tested in test_disaggregated.py."""

import asyncio

import pytest
from ray.exceptions import ActorUnavailableError

from qwen35_ray.serving.config import DisaggregationConfig
from qwen35_ray.serving.disagg import Disaggregator
from qwen35_ray.serving.errors import OpenAIError


def streams(*plans):
    """A stream factory: the k-th call yields plans[k]'s items, then raises if it ends in an
    exception."""
    calls = iter(plans)

    def make():
        plan = next(calls)

        async def gen():
            for item in plan:
                if isinstance(item, BaseException):
                    raise item
                yield item

        return gen()

    return make


LOST = ActorUnavailableError("replica gone", None)


def run(d: Disaggregator, make):
    async def main():
        return [step async for step in d._on_decode(make)]

    return asyncio.run(main())


def test_lost_before_output_is_retried():
    d = Disaggregator(None, None, DisaggregationConfig(retries=1))
    out = run(d, streams([LOST], [{"outputs": [1], "replica": "b"}, {"outputs": [2]}]))
    assert out == [{"outputs": [1]}, {"outputs": [2]}]
    assert d.counters["decode_retries_total"] == 1 and d.decode_replicas == {"b": 1}


def test_lost_after_output_is_a_clean_503():
    d = Disaggregator(None, None, DisaggregationConfig(retries=1))
    with pytest.raises(OpenAIError) as e:
        run(d, streams([{"outputs": [1]}, LOST], [{"outputs": ["never"]}]))
    assert e.value.status == 503 and "retry the request" in str(e.value)


def test_retries_run_out():
    d = Disaggregator(None, None, DisaggregationConfig(retries=1))
    with pytest.raises(OpenAIError):
        run(d, streams([LOST], [LOST]))
    assert d.counters["decode_replica_failures_total"] == 2
