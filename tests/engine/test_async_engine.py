"""AsyncEngine: concurrent streams from asyncio, and aborts that free the cache at once."""

import asyncio
import time

import pytest
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.async_engine import AsyncEngine
from qwen35_ray.engine.errors import EngineDead, RequestFailed
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
            # seeded: a first token that stopped the request would leave no state to import
            async for o in prefill.generate(
                "a", prompt(60, 3), SamplingParams(seed=0), prefill_only=True
            )
        ]
        async for _ in small.import_state(outs[-1].request_state):
            pass

    with pytest.raises(ValueError, match="61 tokens; the context here is 32"):
        asyncio.run(main())
    assert small.engine.cache_manager.is_empty


def test_a_failing_add_fails_its_stream_and_the_loop_goes_on(setup, monkeypatch):
    """Before: an exception in add_request killed the loop, and every later request failed."""
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok))
    make = engine.engine._sequence

    def fails_for_bad(request_id, *args):
        if request_id == "bad":
            raise RuntimeError("a bug while adding")
        return make(request_id, *args)

    monkeypatch.setattr(engine.engine, "_sequence", fails_for_bad)
    params = SamplingParams(max_tokens=5, **GREEDY)

    async def tokens(rid):
        outs = [o async for o in engine.generate(rid, prompt(9, 2), params)]
        return outs[-1].outputs[0].token_ids

    async def main():
        got = await asyncio.gather(tokens("a"), tokens("bad"), return_exceptions=True)
        return got, await tokens("after")

    (a, bad), after = asyncio.run(main())
    assert isinstance(bad, RequestFailed) and "'bad'" in str(bad)
    assert a == after and len(a) == 5
    assert not engine.dead and engine.engine.cache_manager.is_empty


def test_extreme_params_through_the_loop_leave_it_serving(setup):
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok))
    extreme = [
        dict(temperature=1e-300),
        dict(repetition_penalty=1e-300),
        dict(repetition_penalty=1e300),
        dict(n=2, seed=2**63 - 1),
        dict(n=2, seed=-(2**63)),
    ]

    async def last(rid, params):
        return [o async for o in engine.generate(rid, prompt(9, 2), params)][-1]

    async def main():
        greedy = SamplingParams(max_tokens=5, **GREEDY)
        before = await last("before", greedy)
        outs = await asyncio.gather(
            *(last(f"x{i}", SamplingParams(max_tokens=3, **p)) for i, p in enumerate(extreme))
        )
        return before, outs, await last("after", greedy)

    before, outs, after = asyncio.run(main())
    assert all(o.finished and o.error is None for o in outs)
    assert after.outputs[0].token_ids == before.outputs[0].token_ids
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["state_slots_free"] == stats["state_slots_total"]
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_model_failure_kills_the_engine_for_every_stream(setup, monkeypatch):
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok))

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.engine.executor.runner, "model", broken)
    params = SamplingParams(max_tokens=5, **GREEDY)

    async def drain(rid):
        async for _ in engine.generate(rid, prompt(9, 2), params):
            pass

    async def main():
        opened = await asyncio.gather(drain("a"), drain("b"), return_exceptions=True)
        later = await asyncio.gather(drain("c"), return_exceptions=True)
        return opened + later

    errors = asyncio.run(main())
    assert all(isinstance(e, EngineDead) for e in errors), errors
    assert engine.dead


def test_stats_count_queued_and_running_requests(setup):
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok, max_num_seqs=1))
    prompts = {"a": prompt(9, 1), "b": prompt(13, 2), "c": prompt(17, 3)}

    async def main():
        params = SamplingParams(max_tokens=8, **GREEDY)
        streams = {r: engine.generate(r, ids, params) for r, ids in prompts.items()}
        firsts = [asyncio.ensure_future(anext(s)) for s in streams.values()]
        # the three adds are queued; the loop has not applied them yet
        await asyncio.sleep(0)
        queued = engine.stats()
        await firsts[0]
        # a runs in the one state slot; b and c wait, still queued or in the scheduler
        during = engine.stats()
        await asyncio.gather(*firsts)
        for stream in streams.values():
            async for _ in stream:
                pass
        return queued, during, engine.stats()

    queued, during, after = asyncio.run(main())
    assert (queued["waiting"], queued["waiting_prompt_tokens"]) == (3, 39)
    assert queued["pending_prompt_tokens"] == 39
    assert (during["running"], during["waiting"], during["waiting_prompt_tokens"]) == (1, 2, 30)
    # a is prefilled (it sampled its first token): only b and c remain to prefill
    assert during["pending_prompt_tokens"] == 30
    assert after["running"] == after["waiting"] == after["waiting_prompt_tokens"] == 0
    assert after["pending_prompt_tokens"] == 0
    assert after["state_slots_free"] == after["state_slots_total"] == 1
    assert after["kv_blocks_free"] == after["kv_blocks_total"]
    assert after["generation_tokens_total"] == 24


def test_steps_go_on_while_the_event_loop_is_busy(setup):
    # the step thread runs steps back to back: a loop held by other work (a Serve replica's
    # serialization, the ingress's parsing) delays delivery, not the engine's next step
    path, tok = setup
    engine = AsyncEngine(make_engine(path, tok, compile_decode=False))
    counters = engine.engine.step_counters

    async def main():
        stream = engine.generate("a", prompt(10, 1), SamplingParams(max_tokens=60, **GREEDY))
        first = await anext(stream)
        before = counters.steps
        time.sleep(0.5)  # blocks the event loop, not the step thread
        during = counters.steps - before
        rest = [out async for out in stream]
        return first, during, rest

    first, during, rest = asyncio.run(main())
    assert during >= 5, f"only {during} steps ran while the loop was blocked"
    # what ran meanwhile still reached the stream, in order, to the end
    lengths = [len(o.outputs[0].token_ids) for o in [first, *rest]]
    assert lengths == sorted(lengths) and rest[-1].finished and lengths[-1] == 60
    assert engine.engine.cache_manager.is_empty
