"""The engine over a YaRN checkpoint: its context is factor x original_max_position_embeddings,
a longer max_model_len is refused by name, a prompt of thousands of tokens prefilled in chunks
by the scheduler decodes as transformers does, and the RequestState fingerprint tells the rope
scaling apart."""

import dataclasses

import pytest
import torch
from engine_fixtures import hf_greedy, make_engine, prompt, run, tiny_tokenizer
from hf_reference import hf_model, save

from qwen35_ray.engine.cache_sizing import resolve_max_model_len
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.request_state import model_fingerprint
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.config import ModelConfig

ORIGINAL = 1024
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10_000_000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [2, 1, 1],
    "mrope_interleaved": True,
    "factor": 4.0,
    "original_max_position_embeddings": ORIGINAL,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = hf_model("qwen3_5", max_position_embeddings=ORIGINAL, rope_parameters=dict(YARN))
    path = save(ref, tmp_path_factory.mktemp("yarn"))
    return ref, path, tiny_tokenizer(tmp_path_factory)


def test_context_is_factor_times_original_and_no_more(setup):
    _, path, _ = setup
    config = ModelConfig.from_hf(path)
    assert resolve_max_model_len(config, EngineConfig()) == 4 * ORIGINAL
    assert resolve_max_model_len(config, EngineConfig(max_model_len=3000)) == 3000
    with pytest.raises(
        ValueError,
        match=r"max_model_len=5000 exceeds the model's 4096-token context \(YaRN factor 4 x "
        r"original_max_position_embeddings 1024\); lower max_model_len",
    ):
        resolve_max_model_len(config, EngineConfig(max_model_len=5000))
    plain = dataclasses.replace(config, rope_scaling=None)
    with pytest.raises(ValueError, match=r"1024-token context \(max_position_embeddings=1024\)"):
        resolve_max_model_len(plain, EngineConfig(max_model_len=2048))


def test_long_prompt_in_chunks_then_decode_as_transformers(setup):
    """A 3000-token prompt beside a short one, prefilled 1024 tokens a step, then greedy
    decodes at positions past 2.9x the original context."""
    ref, path, tok = setup
    engine = make_engine(path, tok, max_num_batched_tokens=1024)
    assert engine.max_model_len == 4 * ORIGINAL
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    requests = {"long": (prompt(3000, seed=5), greedy), "short": (prompt(40, seed=6), greedy)}
    done = run(engine, requests)
    for rid, (ids, params) in requests.items():
        assert done[rid].outputs[0].token_ids == hf_greedy(ref, ids, params.max_tokens), rid


def test_fingerprint_follows_rope_scaling(setup):
    _, path, _ = setup
    config = ModelConfig.from_hf(path)
    twice = dataclasses.replace(
        config, rope_scaling=dataclasses.replace(config.rope_scaling, factor=2.0)
    )
    prints = {
        model_fingerprint(c, torch.float32, "w")
        for c in (config, twice, dataclasses.replace(config, rope_scaling=None))
    }
    assert len(prints) == 3
