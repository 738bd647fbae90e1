"""RequestState: prefill here, decode in another process, same tokens as never moved."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import checkpoint, make_engine, prompt, run, tiny_tokenizer

from qwen35_ray.engine.request_state import RequestState, state_nbytes
from qwen35_ray.engine.sampling_params import SamplingParams

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
        env={"PYTHONPATH": str(SUPPORT), "PATH": ""},
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
    assert torch.equal(back.rng_state, state.rng_state)
    for k, v in state.tensors.items():
        assert torch.equal(back.tensors[k], v)
