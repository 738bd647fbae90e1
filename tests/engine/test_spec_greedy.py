"""The one-forward speculative step of greedy verify rows (engine/spec_greedy.py,
model/greedy_spec.py) does what the general step does, token for token and draft for draft: the
engine's outputs equal its outputs without speculation, and its draft and acceptance counters
equal those of the same engine with the one-forward step switched off (equal counters over
hundreds of drafts mean equal drafts: a different draft is kept or rejected differently). The
workload has what ends or shapes a greedy row inside the step: requests of several lengths
finishing at different steps, a stop string and max_tokens inside kept drafts, two siblings
(n=2), and a request added while the others decode, whose prompt chunks make those steps
general ones."""

import pytest
import torch

from qwen35_ray.engine import spec_greedy, spec_step
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.mtp_distill import ordinary_token_ids

ENGINE = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64, block_size=16)


@pytest.fixture(scope="module", params=["qwen35-tiny", "qwen35-tiny-dense"])
def checkpoint(request, chain_checkpoint):
    return str(chain_checkpoint(request.param))


@pytest.fixture(scope="module")
def requests(checkpoint):
    vocab = ordinary_token_ids(checkpoint)
    g = torch.Generator().manual_seed(5)
    prompt = lambda n: vocab[torch.randint(len(vocab), (n,), generator=g)].tolist()
    greedy = lambda **kw: SamplingParams(temperature=0, **{"max_tokens": 40, **kw})
    reqs = {f"g{n}": (prompt(n), greedy()) for n in (6, 19, 33)}
    reqs["max9"] = (prompt(12), greedy(max_tokens=9))
    reqs["n2"] = (prompt(15), greedy(n=2, max_tokens=25))
    ref = run(LLMEngine.from_pretrained(checkpoint, **ENGINE), {"s": (prompt(21), greedy())})
    text = ref["s"][0][0]
    reqs["stop"] = (ref["s"][1], greedy(stop=[text[len(text) // 2 : len(text) // 2 + 3]]))
    reqs["late"] = (prompt(50), greedy(max_tokens=20))  # added once the others decode
    return reqs


def run(engine: LLMEngine, requests: dict) -> dict:
    """{request id: ([(text, token ids, finish reason)], prompt)}; the request "late" added at
    the third step."""
    later = {r: v for r, v in requests.items() if r == "late"}
    for rid, (ids, params) in requests.items():
        if rid not in later:
            engine.add_request(rid, ids, params)
    done, steps = {}, 0
    while engine.has_unfinished() or later:
        steps += 1
        if steps == 3:
            for rid, (ids, params) in later.items():
                engine.add_request(rid, ids, params)
            later = {}
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                outs = [(o.text, o.token_ids, o.finish_reason) for o in out.outputs]
                done[out.request_id] = (outs if len(outs) > 1 else outs[0], out.prompt_token_ids)
    return done


@pytest.mark.parametrize("k", [1, 3])
def test_one_forward_step_equals_the_general_step(checkpoint, requests, monkeypatch, k):
    plain = run(LLMEngine.from_pretrained(checkpoint, **ENGINE), requests)
    spec = dict(speculative={"method": "mtp", "num_speculative_tokens": k})

    calls = {"one": 0, "general": 0}

    def counted(name, fn):
        return lambda *a: calls.__setitem__(name, calls[name] + 1) or fn(*a)

    monkeypatch.setattr(spec_greedy, "run_greedy", counted("one", spec_greedy.run_greedy))
    monkeypatch.setattr(spec_step, "draft", counted("general", spec_step.draft))
    fused = LLMEngine.from_pretrained(checkpoint, **ENGINE, **spec)
    assert run(fused, requests) == plain
    # both kinds ran: general steps for the prompt chunks (the late request's beside verify
    # rows), one-forward steps for the rest
    assert calls["one"] > 10 and calls["general"] > 0, calls

    monkeypatch.setattr(spec_step, "try_greedy", lambda runner, batch: None)
    general = LLMEngine.from_pretrained(checkpoint, **ENGINE, **spec)
    assert run(general, requests) == plain
    counters = lambda e: {n: v for n, v in e.load_stats().items() if n.startswith("spec_")}
    assert counters(fused) == counters(general)
    assert counters(fused)["spec_decode_num_accepted_tokens_total"] > 0
    assert plain["stop"][0][2] == "stop" and plain["max9"][0][2] == "length"
