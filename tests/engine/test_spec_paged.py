"""Speculative decoding on the paged path, the one a GPU runs: the Triton kernels (here under
TRITON_INTERPRET=1), no DecodeKV copies, so the verify rows go through VerifyStep
(model/verify.py) and the MTP head through PagedStep (engine/spec_draft.py). Greedy output
with k = 2 equals the same engine's without speculation, on a distilled dense checkpoint whose
drafts are kept."""

import pytest
import torch

from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.mtp_distill import ordinary_token_ids

# slow tier (.ci/run): speculative decoding through the Triton kernels, interpreted
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(chain_checkpoint):
    return chain_checkpoint("qwen35-tiny-dense")


def run(engine, prompts) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out


def test_speculative_on_the_paged_path_equals_plain_decoding(chain):
    vocab = ordinary_token_ids(chain)
    g = torch.Generator().manual_seed(4)
    prompts = [vocab[torch.randint(len(vocab), (7 + 9 * i,), generator=g)].tolist()
               for i in range(2)]  # fmt: skip
    common = dict(dtype="float32", kernels="triton", max_num_seqs=4, block_size=8)
    plain = run(LLMEngine.from_pretrained(str(chain), **common), prompts)
    spec = LLMEngine.from_pretrained(
        str(chain), speculative={"method": "mtp", "num_speculative_tokens": 2}, **common
    )
    assert spec.executor.cache.decode_kv == [] and spec.executor.runner.compiled_verify is None
    assert run(spec, prompts) == plain
    assert spec.load_stats()["spec_decode_num_accepted_tokens_total"] > 0
