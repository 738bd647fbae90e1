"""RequestState: prefill here, decode in another process or engine, same tokens and logprobs as
never moved; states the importing engine cannot continue are refused, naming what differs."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer
from hf_reference import hf_model, randomize, save
from safetensors.torch import save as save_blob

from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import RequestState, state_nbytes
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.weights import weights_fingerprint

SUPPORT = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, path = checkpoint("qwen3_5_moe", tmp_path_factory)
    tok = tiny_tokenizer(tmp_path_factory)
    tok_dir = tmp_path_factory.mktemp("tokdir")
    tok.save_pretrained(tok_dir)
    return path, tok, tok_dir


def prefill_and_export(engine, ids, params) -> RequestState:
    engine.add_request("moved", ids, params, prefill_only=True)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    (out,) = outs
    assert out.request_state is not None and not out.finished
    assert engine.cache_manager.is_empty
    return out.request_state


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=77, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_decode_in_another_process_equals_never_moved(setup, tmp_path, params):
    path, tok, tok_dir = setup
    ids = prompt(45, 5)
    never_moved = run(make_engine(path, tok), {"x": (ids, params)})["x"].outputs[0].token_ids
    state = prefill_and_export(make_engine(path, tok), ids, params)
    blob = tmp_path / "state.safetensors"
    blob.write_bytes(state.to_bytes())
    out = tmp_path / "tokens.txt"
    subprocess.run(
        [
            sys.executable,
            str(SUPPORT / "decode_elsewhere.py"),
            str(path),
            str(tok_dir),
            str(blob),
            str(out),
        ],
        check=True,
        cwd=tmp_path,
        # a bare environment, but the suite's setting kept (tests/conftest.py): no background
        # compile of the decode step, which a process exiting mid-compile can abort
        env={"PYTHONPATH": str(SUPPORT), "PATH": "", "QWEN35_RAY_COMPILE_DECODE": "0"},
    )
    assert [int(t) for t in out.read_text().split()] == never_moved


def test_exported_size_equals_the_formula(setup):
    path, tok, _ = setup
    engine = make_engine(path, tok)
    for n in (1, 16, 45):
        state = prefill_and_export(
            engine, prompt(n, n), SamplingParams(temperature=0, max_tokens=5)
        )
        assert state.num_computed == n
        assert state.nbytes == state_nbytes(engine.config, engine.dtype, n)
        # the wire blob adds only a header on top of the tensors
        assert 0 < len(state.to_bytes()) - state.nbytes < 64 * 1024


def test_a_state_from_another_model_is_refused(setup):
    path, tok, _ = setup
    engine = make_engine(path, tok)
    state = prefill_and_export(engine, prompt(20, 1), SamplingParams(max_tokens=4))
    state.fingerprint = "0" * 16
    with pytest.raises(ValueError, match="another model"):
        engine.import_request(state)
    good = prefill_and_export(engine, prompt(20, 1), SamplingParams(max_tokens=4))
    good.tensors["key"] = good.tensors["key"][:, :-1]
    with pytest.raises(ValueError, match="RequestState tensor key"):
        engine.import_request(good)
    assert engine.cache_manager.is_empty


def test_round_trip_through_bytes_keeps_everything(setup):
    path, tok, _ = setup
    state = prefill_and_export(
        make_engine(path, tok),
        prompt(30, 2),
        SamplingParams(temperature=0.5, seed=3, stop=["x"], max_tokens=9),
    )
    back = RequestState.from_bytes(state.to_bytes())
    assert back.params == state.params and back.output_token_ids == state.output_token_ids
    assert back.seed == state.seed
    for k, v in state.tensors.items():
        assert torch.equal(back.tensors[k], v)


def decode_here(engine, state: RequestState):
    """Import a state (through its wire bytes) and run it to the end in `engine`."""
    engine.import_request(RequestState.from_bytes(state.to_bytes()))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    assert out.finished and engine.cache_manager.is_empty
    return out.outputs[0]


@pytest.mark.parametrize("top", [0, 3])
def test_logprobs_survive_the_move(setup, top):
    """One logprob entry per token after the move, equal to the never-moved run's."""
    path, tok, _ = setup
    ids, params = prompt(37, 9), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    params.logprobs = top
    never_moved = run(make_engine(path, tok), {"x": (ids, params)})["x"].outputs[0]
    state = prefill_and_export(make_engine(path, tok), ids, params)
    assert len(state.output_logprobs) == 1
    moved = decode_here(make_engine(path, tok), state)
    assert moved.token_ids == never_moved.token_ids
    assert len(moved.logprobs) == len(moved.token_ids) == 8
    for got, want in zip(moved.logprobs, never_moved.logprobs):
        assert got.keys() == want.keys() and len(got) >= 1 + (top > 0)
        assert all(abs(got[t] - want[t]) < 1e-5 for t in want)


@pytest.fixture(scope="module")
def other_seed(setup, tmp_path_factory):
    """The same architecture as `setup`'s checkpoint with weights of another seed: the same
    file names and sizes."""
    ref = hf_model("qwen3_5_moe")
    randomize(ref, seed=7)
    return save(ref, tmp_path_factory.mktemp("other_seed"))


def test_a_state_from_another_checkpoint_is_refused(setup, other_seed):
    path, tok, _ = setup
    here, there = make_engine(path, tok), make_engine(other_seed, tok)
    assert here.fingerprint.split("-")[0] == there.fingerprint.split("-")[0]
    state = prefill_and_export(here, prompt(20, 3), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="another checkpoint") as e:
        there.import_request(state)
    assert here.fingerprint in str(e.value) and there.fingerprint in str(e.value)
    assert there.cache_manager.is_empty


def test_a_copied_checkpoint_has_the_same_fingerprint(setup, tmp_path):
    """Replicas on other nodes hold their own copy of the checkpoint, elsewhere on disk."""
    path, _, _ = setup
    copy = shutil.copytree(path, tmp_path / "copy")
    assert weights_fingerprint(copy) == weights_fingerprint(path)


def test_engines_over_models_built_in_memory_tell_weights_apart(setup):
    """No checkpoint files to hash: the engine samples the parameters themselves."""
    path, tok, _ = setup
    engines = []
    for scale in (1.0, 1.5):
        model, config, _ = load_model(path, dtype="float32", progress=False)
        del model.weights_fingerprint
        model.embed_tokens.weight.mul_(scale)
        engines.append(LLMEngine(model, config, tok, EngineConfig(), None))
    here, there = engines
    state = prefill_and_export(here, prompt(20, 6), SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="another checkpoint"):
        there.import_request(state)
    # the same weights in memory continue it
    assert len(decode_here(here, state).token_ids) == 4


@pytest.fixture(scope="module")
def importer(setup):
    path, tok, _ = setup
    engine = make_engine(path, tok)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=6, logprobs=2)
    return engine, prefill_and_export(engine, prompt(20, 4), params)


def changed(state: RequestState, **fields) -> RequestState:
    return dataclasses.replace(state, **fields)


REFUSALS = {
    "num_computed": (lambda s: changed(s, num_computed=s.num_computed + 1), "num_computed=21"),
    "no_output": (lambda s: changed(s, output_token_ids=[], num_computed=19), "at least one"),
    "output_vocab": (
        lambda s: changed(s, output_token_ids=[10**6]),
        "output_token_ids holds token id 1000000, outside this model's vocabulary",
    ),
    "prompt_vocab": (
        lambda s: changed(s, prompt_token_ids=[-1] + s.prompt_token_ids[1:]),
        "prompt_token_ids holds token id -1",
    ),
    "logprobs_missing": (lambda s: changed(s, output_logprobs=[]), "0 logprobs entries"),
    "logprobs_unasked": (
        lambda s: changed(s, params=dataclasses.replace(s.params, logprobs=None)),
        "1 logprobs entries",
    ),
    "n": (lambda s: changed(s, params=dataclasses.replace(s.params, n=2)), "n=2"),
    "seed_negative": (lambda s: changed(s, seed=-1), r"seed=-1; .* in \[0, 2\*\*64\)"),
    "seed_wide": (lambda s: changed(s, seed=2**64), r"seed=18446744073709551616"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_state_this_engine_cannot_continue_is_refused(importer, case):
    engine, state = importer
    change, message = REFUSALS[case]
    bad = change(state)
    with pytest.raises(ValueError, match=message):
        engine.import_request(bad)
    # also through the wire format, as a decode replica receives it
    with pytest.raises(ValueError, match=message):
        engine.import_request(RequestState.from_bytes(bad.to_bytes()))
    assert engine.cache_manager.is_empty and not engine.has_unfinished()


def rewritten(state: RequestState, edit) -> bytes:
    """The state's wire bytes with its JSON header changed by `edit`."""
    blob = state.to_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["qwen35_ray_request_state"])
    edit(header)
    return save_blob(state.tensors, metadata={"qwen35_ray_request_state": json.dumps(header)})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["params"].update(temperature=-1), "params: temperature=-1 must be >= 0"),
        (lambda h: h["params"].update(bogus=1), "params has unknown field 'bogus'"),
        (lambda h: h.update(num_computed="20"), "num_computed must be an integer"),
        (lambda h: h.update(output_logprobs=[{"x": 0.0}]), "malformed header"),
        (lambda h: h.update(seed="5"), "seed must be an integer"),
        (lambda h: h.pop("seed"), "malformed header"),
        (lambda h: h.update(version=2), "version 2 is not 4"),
    ],
    ids=[
        "params_range",
        "params_unknown",
        "num_computed_type",
        "logprobs_key",
        "seed_type",
        "seed_missing",
        "version",
    ],
)
def test_a_malformed_wire_state_is_a_value_error(importer, edit, message):
    _, state = importer
    with pytest.raises(ValueError, match=message):
        RequestState.from_bytes(rewritten(state, edit))


def test_bytes_that_are_no_state_are_a_value_error():
    with pytest.raises(ValueError, match="not a RequestState blob"):
        RequestState.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
