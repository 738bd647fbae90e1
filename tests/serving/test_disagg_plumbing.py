"""The Disaggregator's failure handling in isolation: a stream whose replica dies before any
output runs again elsewhere; one that dies after output ends with a clean 503. The real thing,
a replica killed under load, is tested in test_disaggregated.py."""

import asyncio

import pytest
from fake_handles import Pool
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


def test_lost_after_admission_before_output_is_retried():
    """A decode replica's admission of an import is no output: losing it after is retried."""
    d = Disaggregator(None, None, DisaggregationConfig(retries=1))
    admitted = {"admitted": True, "replica": "a"}
    out = run(d, streams([admitted, LOST], [{**admitted, "replica": "b"}, {"outputs": [2]}]))
    assert out == [{"admitted": True}, {"admitted": True}, {"outputs": [2]}]
    assert d.counters["decode_retries_total"] == 1


FIRST = {"outputs": [{"index": 0, "token_ids": [7]}], "num_cached_tokens": 0}
# every prompt of these tests is moved
PD = DisaggregationConfig(retries=1, min_prefill_tokens=1)
HANDOFF = {"nbytes": 10, "wire_bytes": 20, "send_s": 0.0, "num_prompt_tokens": 30}


def prefill_pool():
    async def prefill(ids, params, request_id, images=None):
        return {"step": FIRST, "handoff": HANDOFF, "replica": "p"}

    return Pool(prefill=prefill)


def generate(d: Disaggregator, got: list | None = None) -> list:
    """The steps of one moved request, also appended to `got` as they come."""
    got = [] if got is None else got

    async def main():
        async for step in d.generate(list(range(30)), {}):
            got.append(step)

    asyncio.run(main())
    return got


def test_an_overloaded_decode_pool_is_a_503_before_the_first_token():
    async def decode(handoff):
        raise OpenAIError("the server is overloaded; retry later", status=503)
        yield

    d = Disaggregator(prefill_pool(), Pool(decode=decode), PD)
    got = []
    with pytest.raises(OpenAIError) as e:
        generate(d, got)
    # the ingress waits for the first step, so the client gets a plain HTTP 503
    assert e.value.status == 503 and got == []


def test_an_admitted_import_streams_the_first_token_then_the_decode():
    async def decode(handoff):
        yield {"admitted": True, "replica": "d"}
        yield {"outputs": [{"index": 0, "token_ids": [8]}], "receive_s": 0.5}

    d = Disaggregator(prefill_pool(), Pool(decode=decode), PD)
    assert generate(d) == [FIRST, {"outputs": [{"index": 0, "token_ids": [8]}]}]
    assert d.decode_replicas == {"d": 1} and d.counters["transfer_seconds_total"] == 0.5


def test_an_error_item_from_a_replica_is_raised_with_its_status_and_headers():
    """Replicas return errors as their stream's last item (Serve would log a raised one with
    its traceback); the ingress raises it again, Retry-After and all."""
    from qwen35_ray.serving.errors import Overloaded

    async def decode(handoff):
        yield Overloaded("the server is overloaded; retry later").as_item()

    d = Disaggregator(prefill_pool(), Pool(decode=decode), PD)
    got = []
    with pytest.raises(OpenAIError) as e:
        generate(d, got)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"} and got == []


def test_the_handoff_and_images_go_over_rays_transport_and_the_rest_may_not():
    """Calls go over gRPC, which pins every ObjectRef it pickles for the life of the process:
    the prefill answer and the decode call carry the handoff's refs, so they go by reference;
    so do calls with images (megabytes); the rest go over gRPC."""

    async def decode(handoff):
        yield {"admitted": True, "replica": "d"}
        yield {"outputs": [{"index": 0, "token_ids": [8]}]}

    async def local(ids, params, request_id, resume, images):
        yield {"outputs": [{"index": 0, "token_ids": [9]}], "replica": "d"}

    prefill, pool = prefill_pool(), Pool(decode=decode, generate=local)
    d = Disaggregator(prefill, pool, PD)
    generate(d)
    assert prefill.sent == [("prefill", True)] and pool.sent == [("decode", True)]

    def local_request(images):
        async def main():
            return [s async for s in d.generate([1, 2], {}, images)]

        return asyncio.run(main())

    # under min_prefill_tokens: prefilled on the decode pool, with or without images
    d.cfg = DisaggregationConfig(retries=1, min_prefill_tokens=100)
    local_request(None)
    local_request(["an image"])
    assert pool.sent[1:] == [("generate", False), ("generate", True)]
