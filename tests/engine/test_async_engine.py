"""AsyncEngine: concurrent streams from asyncio, and aborts that free the cache at once."""

import asyncio

import pytest
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    return path, tiny_tokenizer(tmp_path_factory)


def test_concurrent_streams_equal_the_offline_engine(setup):
    path, tok = setup
    requests = {
        f"r{i}": (prompt(5 + 7 * i, i), SamplingParams(max_tokens=6 + i, **GREEDY))
        for i in range(6)
    }
    offline = {r: o.outputs[0].token_ids for r, o in run(make_engine(path, tok), requests).items()}
    engine = AsyncEngine(make_engine(path, tok))

    async def one(rid):
        seen = []
        async for out in engine.generate(rid, *requests[rid]):
            seen.append(len(out.outputs[0].token_ids))
        assert seen == sorted(seen) and out.finished
        return rid, out.outputs[0].token_ids

    async def main():
        return dict(await asyncio.gather(*(one(r) for r in requests)))

    assert asyncio.run(main()) == offline
    assert engine.engine.cache_manager.is_empty


def test_leaving_a_stream_aborts_and_frees(setup):
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok))

    async def main():
        stream = engine.generate("a", prompt(30, 1), SamplingParams(max_tokens=200, **GREEDY))
        async for out in stream:
            if len(out.outputs[0].token_ids) == 3:
                break
        await stream.aclose()
        # the abort is applied before the next step
        for _ in range(100):
            if engine.engine.cache_manager.is_empty and not engine.engine.has_unfinished():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_bad_request_raises_before_streaming(setup):
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok, max_model_len=32))

    async def main():
        async for _ in engine.generate("a", prompt(40, 1), SamplingParams()):
            pass

    with pytest.raises(ValueError, match="context of this model is 32"):
        asyncio.run(main())


def test_prefill_here_decode_there_waits_for_room(setup):
    """prefill_only ends its stream with the exported state; import_state continues it in
    another engine. Imports beyond the free state slots wait for one instead of failing."""
    path, tok = setup
    requests = {
        f"r{i}": (prompt(9 + 11 * i, i), SamplingParams(max_tokens=5, seed=i, temperature=0.8))
        for i in range(3)
    }
    offline = {r: o.outputs[0].token_ids for r, o in run(make_engine(path, tok), requests).items()}
    prefill = AsyncEngine(make_engine(path, tok))
    decode = AsyncEngine(make_engine(path, tok, max_num_seqs=1))  # one slot for three imports

    async def one(rid):
        outs = [o async for o in prefill.generate(rid, *requests[rid], prefill_only=True)]
        assert len(outs) == 1 and not outs[0].finished and outs[0].request_state is not None
        outs = [o async for o in decode.import_state(outs[0].request_state)]
        return rid, outs[-1].outputs[0].token_ids

    async def main():
        return dict(await asyncio.gather(*(one(r) for r in requests)))

    assert asyncio.run(main()) == offline
    assert prefill.engine.cache_manager.is_empty and decode.engine.cache_manager.is_empty


def test_import_that_can_never_fit_is_refused(setup):
    path, tok = setup
    prefill = AsyncEngine(make_engine(path, tok))
    small = AsyncEngine(make_engine(path, tok, max_model_len=32))

    async def main():
        outs = [
            o
            async for o in prefill.generate("a", prompt(60, 3), SamplingParams(), prefill_only=True)
        ]
        async for _ in small.import_state(outs[-1].request_state):
            pass

    with pytest.raises(ValueError, match="61 tokens; the context here is 32"):
        asyncio.run(main())
    assert small.engine.cache_manager.is_empty
