"""The offline LLM API: a request that fails raises its error to the caller."""

import pytest

from qwen35_ray.engine.errors import RequestError, RequestFailed
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("qwen35-tiny", dtype="float32", max_model_len=512, kv_cache_memory_bytes=2**24)


def test_generate_returns_one_output_per_prompt_in_order(llm):
    outs = llm.generate(["Hello", "The sky is"], GREEDY)
    assert [o.prompt for o in outs] == ["Hello", "The sky is"]
    assert all(o.finished and o.error is None and len(o.outputs[0].token_ids) == 5 for o in outs)


def test_a_request_that_fails_raises_and_leaves_the_engine_idle(llm):
    before = llm.generate("Hello", GREEDY)[0].outputs[0].token_ids
    # more top logprobs than the vocabulary holds: sampling this request fails
    many = SamplingParams(logprobs=llm.engine.config.vocab_size + 1, max_tokens=4)
    with pytest.raises(RequestFailed, match="request '\\d+' failed while sampling"):
        llm.generate(["Hello", "Hi"], [GREEDY, many])
    assert not llm.engine.has_unfinished() and llm.engine.cache_manager.is_empty
    assert llm.generate("Hello", GREEDY)[0].outputs[0].token_ids == before


def test_a_request_refused_when_added_aborts_the_ones_added_before(llm):
    too_long = SamplingParams(max_tokens=10_000)
    with pytest.raises(RequestError, match="max_tokens=10000"):
        llm.generate(["Hello", "Hi"], [GREEDY, too_long])
    assert not llm.engine.has_unfinished() and llm.engine.cache_manager.is_empty
