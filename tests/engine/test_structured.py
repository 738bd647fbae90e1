"""Structured outputs in the engine: what a grammar lets through is all a sequence can write.

The embedded qwen35-tiny has random weights, so whatever is valid here is valid because of the
grammar. Termination: the schemas bound every string (maxLength) and array (maxItems), and JSON
is compact, so each grammar ends within a few dozen tokens and the output stops there.
"""

import json

import jsonschema
import pytest
from engine_fixtures import run
from json_schemas import PERSON, SCHEMAS

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sampling_params import SamplingParams

NAME = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}}


def new_engine() -> LLMEngine:
    return LLMEngine.from_pretrained(
        "qwen35-tiny",
        dtype="float32",
        max_model_len=512,
        max_num_seqs=20,
        kv_cache_memory_bytes=2**24,
    )


@pytest.fixture(scope="module")
def engine():
    return new_engine()


def ids(engine, text="Reply in JSON: who are you?") -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def generate(engine, requests: dict[str, SamplingParams], prompt=None):
    prompt = prompt or ids(engine)
    return run(engine, {rid: (prompt, params) for rid, params in requests.items()})


def schema_params(schema, **kw) -> SamplingParams:
    kw = {"temperature": 1.0, "max_tokens": 150, **kw}
    return SamplingParams(structured={"type": "json_schema", "schema": schema}, **kw)


def test_twenty_schemas_every_output_validates(engine):
    requests = {f"s{i}": schema_params(s, seed=i) for i, s in enumerate(SCHEMAS)}
    done = generate(engine, requests)
    for i, schema in enumerate(SCHEMAS):
        out = done[f"s{i}"].outputs[0]
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_outputs_are_objects(engine):
    # free strings can run long under a random model: the outputs that stop must parse, and
    # with these seeds some do (deterministic: the seeds fix every draw)
    done = generate(
        engine,
        {
            "o": SamplingParams(
                n=4, temperature=1.0, seed=0, max_tokens=300, structured={"type": "json_object"}
            )
        },
    )
    stopped = [o for o in done["o"].outputs if o.finish_reason == "stop"]
    assert stopped
    for o in stopped:
        assert isinstance(json.loads(o.text), dict)
    for o in done["o"].outputs:
        assert o.text.startswith("{")


def test_n_outputs_vary_and_a_seed_repeats_them(engine):
    params = schema_params(PERSON, n=3, seed=7)
    first = generate(engine, {"a": params})["a"].outputs
    again = generate(engine, {"b": params})["b"].outputs
    assert [o.text for o in first] == [o.text for o in again]
    assert len({o.text for o in first}) > 1
    for o in first:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), PERSON)


def test_constrained_and_free_sequences_share_a_batch(engine):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = generate(engine, {"f": free})["f"].outputs[0].token_ids
    done = generate(engine, {"f2": free, "c": schema_params(NAME, seed=1)})
    assert done["f2"].outputs[0].token_ids == alone
    jsonschema.validate(json.loads(done["c"].outputs[0].text), NAME)


def test_grammar_regex_and_ignore_eos_finish_with_stop(engine):
    done = generate(
        engine,
        {
            "ebnf": SamplingParams(
                seed=2, structured={"type": "grammar", "grammar": 'root ::= "yes" | "no"'}
            ),
            "regex": SamplingParams(
                seed=3, structured={"type": "regex", "pattern": "[0-9]{3}-[a-z]{2}"}
            ),
            # the grammar's end is a stop, whatever ignore_eos says
            "eos": schema_params(NAME, seed=4, ignore_eos=True),
        },
    )
    assert done["ebnf"].outputs[0].text in ("yes", "no")
    regex = done["regex"].outputs[0].text
    assert len(regex) == 6 and regex[:3].isdigit() and regex[3] == "-" and regex[4:].isalpha()
    assert all(done[k].outputs[0].finish_reason == "stop" for k in done)


def test_max_tokens_cuts_a_grammar_with_length(engine):
    long = {"type": "string", "minLength": 50, "maxLength": 60}
    out = generate(engine, {"l": schema_params(long, seed=5, max_tokens=4)})["l"].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith('"')


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "json_schema", "schema": {"type": "objectx"}}, "Unsupported type"),
        ({"type": "json_schema"}, "needs a 'schema'"),
        ({"type": "json_schema", "schema": {"$ref": "#/nowhere"}}, "invalid json_schema"),
        ({"type": "yaml"}, "not one of"),
        ({"type": "grammar", "grammar": "root ::= ("}, "invalid grammar"),
        ({"type": "regex", "pattern": "[a-"}, "invalid regex"),
        ({"type": "structural_tag", "format": {"type": "nope"}}, "invalid structural_tag"),
    ],
)
def test_invalid_specs_are_value_errors_before_any_step(engine, spec, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", ids(engine), SamplingParams(structured=spec))
    assert not engine.has_unfinished()


def prefill_and_export(engine, prompt, params) -> RequestState:
    engine.add_request("moved", prompt, params, prefill_only=True)
    (out,) = engine.step()
    assert out.request_state is not None and not out.finished
    return out.request_state


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_grammar_follows_a_request_to_another_engine(engine, temperature):
    """Prefill here, decode in a second engine: the grammar is rebuilt from the spec in the
    RequestState and advanced over the first token; the output equals the never-moved one."""
    params = schema_params(PERSON, temperature=temperature, seed=11)
    prompt = ids(engine)
    never_moved = generate(engine, {"x": params}, prompt)["x"].outputs[0]
    state = prefill_and_export(engine, prompt, params)
    assert state.output_token_ids == never_moved.token_ids[:1]
    other = new_engine()
    other.import_request(RequestState.from_bytes(state.to_bytes()))
    out = None
    while other.has_unfinished():
        out = other.step()[-1]
    moved = out.outputs[0]
    assert moved.token_ids == never_moved.token_ids
    assert moved.finish_reason == "stop"
    jsonschema.validate(json.loads(moved.text), PERSON)


def test_a_state_whose_tokens_break_its_grammar_is_refused(engine):
    state = prefill_and_export(engine, ids(engine), schema_params(PERSON, seed=1))
    # a JSON object cannot start with a letter
    state.output_token_ids = engine.tokenizer("x")["input_ids"]
    with pytest.raises(ValueError, match="does not follow"):
        engine.import_request(state)
    assert engine.cache_manager.is_empty


def test_a_grammar_after_reasoning_starts_at_its_token(engine):
    tok, so = engine.tokenizer, engine.structured
    g = so.grammar({"type": "grammar", "grammar": 'root ::= "yes"', "after": "</think>"})
    for t in tok.encode("free thoughts, even {\n", add_special_tokens=False):
        assert g.accept(t)
    assert so.start_fill([None]) is None
    # while thinking, every token is allowed but a stop token: the answer is still to come
    thinking = so.start_fill([g]).result()
    assert thinking.rows == [0]
    allowed = allowed_ids(thinking.bitmask[0], engine.config.vocab_size)
    assert allowed == set(range(engine.config.vocab_size)) - engine.eos_token_ids
    assert g.accept(tok.convert_tokens_to_ids("</think>"))
    answer = so.start_fill([g]).result()
    assert answer.rows == [0]
    assert allowed_ids(answer.bitmask[0], engine.config.vocab_size) == set(
        tok.encode("y", add_special_tokens=False)
    )
    assert not g.accept(tok.encode("no", add_special_tokens=False)[0])
    with pytest.raises(ValueError, match="single token"):
        so.compile({"type": "json_object", "after": "not one token"})


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "json_object"},
        {"type": "json_schema", "schema": NAME},
        {"type": "json_schema", "schema": {"properties": {"name": {"type": "string"}}}},
    ],
    ids=["json_object", "bounded_string", "unbounded_string"],
)
def test_json_strings_refuse_surrogates_and_control_characters(engine, spec):
    """A surrogate's 3-byte form (ED A0 80) is not UTF-8: it decodes as U+FFFD, so the text
    has more characters than the grammar counted. The grammar refuses its second byte."""
    g = engine.structured.grammar(spec)
    byte = byte_tokens(engine.tokenizer)
    # é and U+D7FF, the code point just below the surrogates
    assert all(g.accept(byte[b]) for b in b'{"name": "\xc3\xa9\xed\x9f\xbf')
    assert g.accept(byte[0xED])
    assert not g.accept(byte[0xA0])
    assert g.accept(byte[0x80]) and g.accept(byte[0x80])  # ED 80 80 is U+D000
    assert not g.accept(byte[ord("\n")])
    assert all(g.accept(byte[b]) for b in b'"}')


@pytest.mark.parametrize("escape, ok", [("d7ff", True), ("00e9", True), ("d800", False)])
def test_json_strings_refuse_surrogate_escapes(engine, escape, ok):
    """json.loads turns a \\ud800 escape into a lone surrogate, which no UTF-8 encoder takes."""
    g = engine.structured.grammar({"type": "json_object"})
    byte = byte_tokens(engine.tokenizer)
    assert all(g.accept(byte[b]) for b in b'{"name": "\\u' + escape[:1].encode())
    assert all(g.accept(byte[b]) for b in escape[1:].encode()) == ok


def allowed_ids(words, vocab_size: int) -> set[int]:
    """The token ids a packed bitmask row [W] allows."""
    return {t for t in range(vocab_size) if int(words[t // 32]) >> (t % 32) & 1}


def byte_tokens(tokenizer) -> dict[int, int]:
    """The token id of each single byte of a byte-level BPE tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {b: tokenizer.convert_tokens_to_ids(u) for b, u in bytes_to_unicode().items()}
