"""LLMServer on its own (no Ray): its stream sent at most once per stream_interval_s (by the
AsyncEngine) with the same tokens as one item per step, its pool's torch_threads, and
wait_compiled for a benchmark."""

import asyncio

import pytest
import torch

from qwen35_ray.cli import main as cli
from qwen35_ray.serving.llm_server import LLMServer

PARAMS = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cli(["make-tiny", str(out)])
    return str(out)


def server(tiny, **extra):
    config = {"model": tiny, "dtype": "float32", "engine": {"max_num_seqs": 2}, **extra}
    return LLMServer(config)


def tokens(items):
    return [t for item in items for d in item["outputs"] for t in d["token_ids"]]


def text(items):
    return "".join(d["text"] for item in items for d in item["outputs"])


def test_a_coalesced_stream_has_the_same_tokens_in_fewer_items(tiny):
    async def run(s):
        return [item async for item in s.generate([5, 6, 7], PARAMS)]

    per_step = asyncio.run(run(server(tiny, stream_interval_s=0)))
    coalesced = asyncio.run(run(server(tiny, stream_interval_s=0.2)))
    assert tokens(coalesced) == tokens(per_step) and len(tokens(per_step)) == 40
    assert text(coalesced) == text(per_step)
    # one item per step with a token, against the first token alone and then a few
    assert len([i for i in per_step if tokens([i])]) == 40
    assert len(coalesced) < len(per_step) / 2
    # the first token goes alone, at once (time to first token)
    first = next(item for item in coalesced if tokens([item]))
    assert len(tokens([first])) == 1
    assert coalesced[-1]["outputs"][0]["finish_reason"] == "length"


def test_pool_torch_threads_are_set_in_the_replica(tiny):
    before = torch.get_num_threads()
    try:
        server(tiny, llm_server={"torch_threads": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_wait_compiled_answers_false_at_once_without_a_compiled_step(tiny):
    s = server(tiny, engine={"max_num_seqs": 2, "compile_decode": False})
    assert asyncio.run(asyncio.wait_for(s.wait_compiled(timeout_s=60), 10)) is False
