"""Stop strings across token boundaries: the text an output shows while it runs (which serving
streams by slicing) never holds the start of a stop string, only grows, and the finished text
ends exactly before the first stop string, as in vLLM."""

import pytest
from engine_fixtures import prompt

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams

FREE = dict(max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_pretrained(
        "qwen35-tiny", dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**24
    )


def stream(engine, ids, params) -> tuple[dict[int, list], dict]:
    """Step the engine: ({index: [(text, token_ids) shown after each step while it ran]},
    final outputs)."""
    engine.add_request("r", ids, params)
    shown, final = {i: [] for i in range(params.n)}, None
    while engine.has_unfinished():
        for out in engine.step():
            for o in out.outputs:
                if not o.finished:
                    shown[o.index].append((o.text, list(o.token_ids)))
            final = out
    assert final.finished
    return shown, {o.index: o for o in final.outputs}


def token_spans(tok, token_ids) -> list[tuple[int, int]]:
    """Each token's (start, end) characters in the decoded text; tokens that end inside a
    character are given to the token that completes it."""
    ends = [len(tok.decode(token_ids[: i + 1]).rstrip("\ufffd")) for i in range(len(token_ids))]
    return list(zip([0] + ends[:-1], ends))


def mid_token_stops(text, spans) -> list[str]:
    """Stops that start inside one token's text and end inside a later one's: across one
    boundary and across several."""
    wide = [(s, e) for s, e in spans if e - s >= 2]
    stops = []
    for gap in (1, 3):
        for i in range(len(wide) - gap):
            (s1, e1), (s2, _) = wide[i], wide[i + gap]
            if s2 >= e1:
                stops.append(text[s1 + 1 : s2 + 1])
                break
    assert len(stops) == 2, "the reference text has too few multi-character tokens"
    return stops


def check(shown, final, reference, stops, tok):
    longest = max(map(len, stops))
    hits = [reference.find(s) for s in stops if s in reference]
    if hits:
        assert final.finish_reason == "stop"
        assert final.text == reference[: min(hits)]
    else:
        assert final.text == reference
    for text, token_ids in shown:
        assert final.text.startswith(text)
        # held back: at most the longest stop less one character
        assert len(text) >= len(tok.decode(token_ids).rstrip("\ufffd")) - (longest - 1)


def test_greedy_stops_starting_and_ending_mid_token(engine):
    tok = engine.tokenizer
    ids = prompt(12, 8, vocab=1000)
    _, ref = stream(engine, ids, SamplingParams(temperature=0, **FREE))
    reference = ref[0].text
    stops = mid_token_stops(reference, token_spans(tok, ref[0].token_ids))
    cases = [[s] for s in stops] + [stops, [stops[0], "never in the text at all"]]
    for stop in cases:
        shown, final = stream(engine, ids, SamplingParams(temperature=0, stop=stop, **FREE))
        check(shown[0], final[0], reference, stop, tok)
        assert final[0].finish_reason == "stop"
    # a stop that never comes: the whole text, and nothing held back once finished
    shown, final = stream(engine, ids, SamplingParams(temperature=0, stop=["\x00\x01"], **FREE))
    check(shown[0], final[0], reference, ["\x00\x01"], tok)
    assert final[0].finish_reason == "length"


def test_two_seeded_outputs_each_stop_at_their_own_first_stop(engine):
    tok = engine.tokenizer
    ids = prompt(9, 21, vocab=1000)
    sampled = dict(n=2, temperature=0.8, seed=7, **FREE)
    _, ref = stream(engine, ids, SamplingParams(**sampled))
    assert ref[0].text != ref[1].text
    stops = mid_token_stops(ref[1].text, token_spans(tok, ref[1].token_ids))
    # the same stops from output 0 too, so each output has one of its own
    stops += mid_token_stops(ref[0].text, token_spans(tok, ref[0].token_ids))
    shown, final = stream(engine, ids, SamplingParams(stop=stops, **sampled))
    for i in (0, 1):
        check(shown[i], final[i], ref[i].text, stops, tok)
        assert final[i].finish_reason == "stop"
