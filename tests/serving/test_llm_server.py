"""LLMServer on its own (no Ray): deltas, bad values as 400s, and 503 when the queue is full."""

import asyncio

import pytest

from qwen35_ray.cli import main as cli
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.llm_server import LLMServer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(out)])
    return str(out)


def server(tiny, **extra):
    return LLMServer({"model": tiny, "dtype": "float32", "engine": {"max_num_seqs": 2}, **extra})


async def drain(gen):
    return [item async for item in gen]


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
