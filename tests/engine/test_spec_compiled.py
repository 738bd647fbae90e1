"""The compiled speculative step (engine/verify_graph.py: the verify step, the MTP head's steps
and the one-forward greedy step as torch.compile graphs, CPU) gives the eager engine's output
without speculation, token for token, greedy and seeded-sampled alike, on a distilled dense
checkpoint whose drafts are kept. Compiling takes minutes on 2 cores: one engine, a few
requests."""

import pytest
import torch

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.mtp_distill import ordinary_token_ids


@pytest.fixture(scope="module")
def chain(chain_checkpoint):
    return chain_checkpoint("qwen35-tiny-dense")


def outputs(engine, prompts, params) -> dict:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = [(c.token_ids, c.finish_reason) for c in o.outputs]
    return out


@pytest.mark.slow
def test_compiled_speculative_step_equals_plain_decoding(chain):
    vocab = ordinary_token_ids(chain)
    g = torch.Generator().manual_seed(3)
    prompts = [vocab[torch.randint(len(vocab), (9 + 11 * i,), generator=g)].tolist()
               for i in range(5)]  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 4 + [
        SamplingParams(temperature=0.8, top_p=0.9, n=2, seed=7, max_tokens=30, ignore_eos=True)
    ]
    common = dict(dtype="float32", max_num_seqs=4)
    plain = outputs(LLMEngine.from_pretrained(str(chain), compile_decode=False, **common),
                    prompts, params)  # fmt: skip
    spec = LLMEngine.from_pretrained(
        str(chain), compile_decode=True, speculative={"method": "mtp", "num_speculative_tokens": 2},
        **common,
    )  # fmt: skip
    compiled = spec.executor.runner.compiled_verify
    assert compiled.ready
    greedy = outputs(spec, prompts[:4], params[:4])
    assert greedy == {k: v for k, v in plain.items() if k != "4"}
    # greedy rows only: the one-forward graph (engine/spec_greedy.py)
    assert compiled.greedy_steps > 0
    assert spec.load_stats()["spec_decode_num_accepted_tokens_total"] > 0
    # the sampled request keeps drafts by rejection sampling: its tokens differ from plain
    # decoding's draws but not in distribution (test_spec_sampling.py); here it must run
    # through the graphs and finish
    sampled = outputs(spec, prompts[4:], params[4:])["0"]
    assert [len(t) for t, _ in sampled] == [30, 30]
    assert compiled.steps > 0
