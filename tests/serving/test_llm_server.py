"""LLMServer on its own (no Ray): deltas, bad values as 400s, a full queue (in prompts or in
prompt tokens) as a fast 503 with Retry-After, and a dead engine failing its streams with a 503,
later requests at once, and the replica's health check."""

import asyncio

import pytest

from qwen35_ray.cli import main as cli
from qwen35_ray.serving.errors import OpenAIError, raise_error_item
from qwen35_ray.serving.llm_server import LLMServer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(out)])
    return str(out)


def server(tiny, **extra):
    return LLMServer({"model": tiny, "dtype": "float32", "engine": {"max_num_seqs": 2}, **extra})


PARAMS = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}


async def drain(gen):
    """The stream's items; an error item (how replicas return errors) is raised, as the
    ingress does."""
    items = [item async for item in gen]
    for item in items:
        raise_error_item(item)
    return items


def test_deltas_add_up_to_the_output(tiny):
    s = server(tiny)
    params = {"temperature": 0, "max_tokens": 7, "ignore_eos": True}
    steps = asyncio.run(drain(s.generate([5, 6, 7], params)))
    tokens = [t for step in steps for d in step["outputs"] for t in d["token_ids"]]
    assert len(tokens) == 7 and steps[-1]["outputs"][0]["finish_reason"] == "length"


def test_invalid_sampling_values_are_400(tiny):
    s = server(tiny)
    with pytest.raises(OpenAIError) as e:
        asyncio.run(drain(s.generate([5, 6], {"temperature": -1})))
    assert e.value.status == 400 and "temperature" in e.value.message


def test_full_queue_is_503_and_the_rest_complete(tiny):
    s = server(tiny, max_waiting_requests=1)
    params = {"temperature": 0, "max_tokens": 200, "ignore_eos": True}

    async def main():
        # two run (two slots), one waits; the queue is then full for the next
        running = [asyncio.ensure_future(drain(s.generate([5, 6, 7], params))) for _ in range(3)]
        await asyncio.sleep(0)
        while s.stats()["waiting"] < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(OpenAIError) as e:
            await drain(s.generate([5, 6, 7], params))
        assert e.value.status == 503 and e.value.type == "server_overloaded"
        return await asyncio.gather(*running)

    results = asyncio.run(main())
    assert all(r[-1]["outputs"][0]["finish_reason"] == "length" for r in results)
    assert s.stats()["requests_rejected_total"] == 1


async def until(predicate):
    while not predicate():
        await asyncio.sleep(0.01)


def test_waiting_prompt_tokens_bound_the_queue(tiny):
    s = server(tiny, max_waiting_prompt_tokens=100, engine={"max_num_seqs": 1})

    async def main():
        running = asyncio.ensure_future(drain(s.generate([5] * 10, PARAMS)))
        waiting = asyncio.ensure_future(drain(s.generate([6] * 60, PARAMS)))
        await until(lambda: s.stats()["waiting"] == 1 and s.stats()["running"] == 1)
        # 60 waiting + 50 > 100: refused, whatever the prompt count
        with pytest.raises(OpenAIError) as e:
            await drain(s.generate([7] * 50, PARAMS))
        # 60 + 40 fits
        fits = asyncio.ensure_future(drain(s.generate([8] * 40, PARAMS)))
        return e.value, await asyncio.gather(running, waiting, fits)

    error, done = asyncio.run(main())
    assert error.status == 503 and error.headers["Retry-After"] == "1"
    assert error.response().headers["retry-after"] == "1"
    assert all(r[-1]["outputs"][0]["finish_reason"] == "length" for r in done)
    stats = s.stats()
    assert stats["requests_rejected_total"] == 1 and stats["running"] == stats["waiting"] == 0
    assert stats["state_slots_free"] == stats["state_slots_total"]


def test_a_long_prompt_is_admitted_to_an_empty_queue(tiny):
    s = server(tiny, max_waiting_prompt_tokens=8, engine={"max_num_seqs": 1})
    out = asyncio.run(drain(s.generate(list(range(5, 105)), {**PARAMS, "max_tokens": 2})))
    assert out[-1]["outputs"][0]["finish_reason"] == "length"


def test_a_dead_engine_fails_fast_and_reports_unhealthy(tiny):
    s = server(tiny, engine={"max_num_seqs": 2})
    before = asyncio.run(drain(s.generate([5, 6, 7], PARAMS)))
    s.check_health()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    async def main():
        first = asyncio.ensure_future(drain(s.generate([5, 6, 7], PARAMS)))
        await until(lambda: s.stats()["generation_tokens_total"] > 45)
        s.engine.engine.executor.runner.model.forward = broken
        with pytest.raises(OpenAIError) as open_stream:
            await first
        with pytest.raises(OpenAIError) as later:
            await drain(s.generate([5, 6, 7], PARAMS))
        return open_stream.value, later.value

    open_stream, later = asyncio.run(main())
    for e in (open_stream, later):
        assert e.status == 503 and e.type == "service_unavailable"
        assert "simulated" not in e.message  # no internals to clients
    with pytest.raises(RuntimeError, match="replaced"):
        s.check_health()
    assert before[-1]["outputs"][0]["finish_reason"] == "length"
