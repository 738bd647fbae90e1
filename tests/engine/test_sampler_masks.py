"""Grammar masks applied where the logits are: the same -inf tokens as xgrammar's own kernel."""

import pytest
import torch
import xgrammar as xgr

from qwen35_ray.engine.structured import Masks, apply_bitmask


def random_masks(B: int, V: int, rows: list[int], seed=42) -> Masks:
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (B, -(-V // 32)), generator=gen, dtype=torch.int64)
    return Masks(bits.to(torch.int32), rows, {})


@pytest.mark.parametrize("V", [63, 64, 1000])
def test_apply_bitmask_forbids_what_xgrammar_forbids(V):
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    masks = random_masks(5, V, [0, 2, 3])
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, masks.bitmask, vocab_size=V, indices=masks.rows)
    got = apply_bitmask(logits, masks)
    assert torch.equal(got, want)
    # a copy: the model's own logits stay for logprobs
    assert torch.isfinite(logits).all()


def test_tokens_past_the_bitmask_stay_unmasked():
    logits = torch.randn(2, 70)
    masks = Masks(torch.zeros(2, 2, dtype=torch.int32), [1], {})
    got = apply_bitmask(logits, masks)
    assert torch.isinf(got[1, :64]).all() and torch.equal(got[1, 64:], logits[1, 64:])
    assert torch.equal(got[0], logits[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_apply_bitmask_on_the_gpu_matches_the_cpu():
    V = 248320
    logits = torch.randn(8, V)
    masks = random_masks(8, V, [1, 4, 7])
    assert torch.equal(apply_bitmask(logits.cuda(), masks).cpu(), apply_bitmask(logits, masks))
