"""VerifyStep (model/verify.py): several tokens per sequence in one forward give the logits of
as many single-token decodes, and the GDN states after each of them, so a rejected draft is
rolled back exactly by committing the states of the last kept token."""

import pytest
import torch
from hf_reference import hf_model, save
from model_driver import Driver

from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.loader import load_model


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_5"])
def model(request, tmp_path_factory):
    path = save(hf_model(request.param), tmp_path_factory.mktemp(request.param))
    net, config, _ = load_model(path, dtype="float32", progress=False)
    return net, config


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def gdn_states(driver: Driver, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    return driver.cache.conv[:, slot].clone(), driver.cache.recurrent[:, slot].clone()


def decoded(model, prompts: dict[int, list[int]], then: dict[int, list[int]]):
    """The reference: prefill each prompt, then decode `then` one token at a time. Returns
    {seq: (logits [len, V], [GDN states after each token])}."""
    net, config = model
    d = Driver(net, config)
    d.step(prompts)
    out = {seq: ([], []) for seq in then}
    for i in range(len(next(iter(then.values())))):
        logits, _, _ = d.step({seq: [ids[i]] for seq, ids in then.items()})
        for seq in then:
            out[seq][0].append(logits[seq][0])
            out[seq][1].append(gdn_states(d, seq))
    return {seq: (torch.stack(lg), states) for seq, (lg, states) in out.items()}


def verify(driver: Driver, model, pieces: dict[int, list[int]]):
    net, _ = model
    width = len(next(iter(pieces.values())))
    chunks = [
        SeqChunk(driver.computed[s], width, s, driver._table(s, driver.computed[s] + width))
        for s in pieces
    ]
    batch = ForwardBatch.build(chunks, 16)
    ids = torch.tensor([t for p in pieces.values() for t in p])
    with torch.no_grad():
        hidden, step = net.verify(ids, batch, driver.cache, width)
    return net.compute_logits(hidden).view(len(pieces), width, -1), step


@pytest.mark.parametrize("width", [2, 4])
def test_verify_equals_decoding_token_by_token(model, width):
    net, config = model
    prompts = {0: tokens(21, 1), 1: tokens(7, 2), 2: tokens(40, 3)}
    drafts = {s: tokens(width, 10 + s) for s in prompts}
    want = decoded(model, prompts, drafts)

    d = Driver(net, config)
    d.step(prompts)
    before = {s: gdn_states(d, s) for s in prompts}
    logits, step = verify(d, model, drafts)
    for b, s in enumerate(prompts):
        torch.testing.assert_close(logits[b], want[s][0], atol=1e-4, rtol=0)
        # nothing written to the slots yet; every position's states kept
        for got, was in zip(gdn_states(d, s), before[s]):
            assert torch.equal(got, was)
        for i in range(width):
            conv, rec = want[s][1][i]
            for layer in range(conv.shape[0]):
                torch.testing.assert_close(step.conv_states[layer][b, i], conv[layer])
                torch.testing.assert_close(
                    step.recurrent_states[layer][b, i], rec[layer], atol=1e-5, rtol=0
                )


def test_a_rejected_draft_leaves_no_trace(model):
    # three sequences keep 1, 2 and 4 of their 4 verified tokens, then decode on: each
    # continues exactly as if only its kept tokens had ever been run
    net, config = model
    prompts = {0: tokens(21, 1), 1: tokens(7, 2), 2: tokens(40, 3)}
    drafts = {s: tokens(4, 20 + s) for s in prompts}
    kept = {0: 1, 1: 2, 2: 4}
    after = {s: tokens(3, 30 + s) for s in prompts}

    d = Driver(net, config)
    d.step(prompts)
    _, step = verify(d, model, drafts)
    step.commit([kept[s] for s in prompts])
    for s in prompts:
        d.computed[s] += kept[s]
    got = {s: [] for s in prompts}
    for i in range(3):
        logits, _, _ = d.step({s: [after[s][i]] for s in prompts})
        for s in prompts:
            got[s].append(logits[s][0])

    for s in prompts:
        # the reference never saw the rejected drafts
        ref = decoded(model, {s: prompts[s]}, {s: drafts[s][: kept[s]] + after[s]})[s][0]
        torch.testing.assert_close(torch.stack(got[s]), ref[kept[s] :], atol=1e-4, rtol=0)


def test_verify_refuses_ragged_or_fresh_chunks(model):
    net, config = model
    d = Driver(net, config)
    d.step({0: tokens(5, 1)})
    ragged = ForwardBatch.build([SeqChunk(5, 3, 0, d._table(0, 8)), SeqChunk(0, 2, 1, [9])], 16)
    with pytest.raises(ValueError, match="3 tokens after cached state"):
        net.verify(torch.zeros(5, dtype=torch.long), ragged, d.cache, 3)
    _, step = verify(d, model, {0: tokens(3, 2)})
    with pytest.raises(ValueError, match="kept must give"):
        step.commit([4])
