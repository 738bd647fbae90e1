"""Speculative decoding at the model level (issue 22): the pieces the engine will join, run as
one loop for one sequence. Each round verifies the last token and k MTP drafts in one forward
(Qwen35ForCausalLM.verify), keeps drafts by the greedy rule (engine/spec_accept.py), rolls the
GDN states back to the last kept token (VerifyStep.commit), runs the MTP head over the kept
positions (its own K/V at every position) and drafts k more, recursively. The output must be
plain greedy decoding's, token for token, whatever the drafts; on a checkpoint whose head was
distilled from a chained main model (model/mtp_chain.py) drafts are kept."""

import pytest
import torch
from model_driver import Driver

from qwen35_ray.engine.spec_accept import accept_greedy
from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mtp_distill import DistillConfig, distill_mtp, ordinary_token_ids
from qwen35_ray.model.source import resolve_model

K_VALUES = [1, 2, 3]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The random tiny model, and one whose head was distilled from a chained main model."""
    out = tmp_path_factory.mktemp("chain")
    # a short distillation (about 6 s): its head keeps about a third of first drafts here;
    # the default run keeps about 0.8 (docs/mtp.md)
    cfg = DistillConfig(
        steps=120, train_sequences=64, eval_sequences=8, prompt_len=12, new_tokens=40,
        batch_sequences=8, chain_mix=0.12,
    )  # fmt: skip
    distill_mtp("qwen35-tiny", out, cfg)
    return {"random": resolve_model("qwen35-tiny"), "chain": out}


def chunk_batch(d: Driver, start: int, n: int) -> ForwardBatch:
    return ForwardBatch.build([SeqChunk(start, n, 0, d._table(0, start + n))], 16)


@torch.no_grad()
def greedy(net, config, prompt: list[int], n: int) -> list[int]:
    d = Driver(net, config)
    logits, _, _ = d.step({0: prompt})
    out = [int(logits[0][-1].argmax())]
    while len(out) < n:
        logits, _, _ = d.step({0: [out[-1]]})
        out.append(int(logits[0][-1].argmax()))
    return out


@torch.no_grad()
def speculative(net, config, prompt: list[int], n: int, k: int) -> tuple[list[int], list[int]]:
    """(n greedy tokens by speculative decoding, drafts kept in each round)."""
    d = Driver(net, config, with_mtp=True)
    logits, hidden, batch = d.step({0: prompt})
    out = [int(logits[0][-1].argmax())]
    # the head over the prompt: position p reads (h_p, token p+1) and drafts token p+2
    drafts = draft(net, d, hidden, prompt[1:] + out, 0, k)
    kept_per_round = []
    while len(out) < n:
        start = d.computed[0]  # the last token, out[-1], sits here; the drafts after it
        width = k + 1
        batch = chunk_batch(d, start, width)
        ids = torch.tensor([out[-1], *drafts])
        hidden, step = net.verify(ids, batch, d.cache, width)
        target = net.compute_logits(hidden).argmax(-1)
        emitted = accept_greedy(torch.tensor([drafts]), target[None])[0]
        kept = len(emitted)  # the last token and the kept drafts
        step.commit([kept])
        d.computed[0] = start + kept
        kept_per_round.append(kept - 1)
        out += emitted
        drafts = draft(net, d, hidden[:kept], emitted, start, k)
    return out[:n], kept_per_round


def draft(net, d: Driver, hidden: torch.Tensor, next_ids: list[int], start: int, k: int):
    """The head over positions start .. start+len-1 (their main hidden states and the tokens
    after them), then k drafts: the first from its last row, each next from the head's own
    output and the draft before (recursive MTP)."""
    n = len(next_ids)
    h = net.mtp_forward(torch.tensor(next_ids), hidden, chunk_batch(d, start, n), d.cache)
    drafts = [int(net.compute_logits(h[-1:]).argmax())]
    for i in range(1, k):
        pos = start + n - 1 + i
        h = net.mtp_forward(torch.tensor(drafts[-1:]), h[-1:], chunk_batch(d, pos, 1), d.cache)
        drafts.append(int(net.compute_logits(h).argmax()))
    return drafts


def prompts(path, count: int) -> list[list[int]]:
    vocab = ordinary_token_ids(path)
    g = torch.Generator().manual_seed(5)
    return [vocab[torch.randint(len(vocab), (12 + 7 * i,), generator=g)].tolist()
            for i in range(count)]  # fmt: skip


@pytest.mark.parametrize("name", ["random", "chain"])
@pytest.mark.parametrize("k", K_VALUES)
def test_speculative_greedy_equals_greedy(checkpoints, name, k):
    path = checkpoints[name]
    net, config, _ = load_model(path, dtype="float32", with_mtp=True, progress=False)
    kept = []
    for prompt in prompts(path, 3):
        want = greedy(net, config, prompt, 40)
        got, rounds = speculative(net, config, prompt, 40, k)
        assert got == want
        kept += rounds
    mean_kept = sum(kept) / len(kept)  # drafts kept per round
    if name == "chain":
        # drafts are kept, so rounds are fewer than tokens
        assert mean_kept > 0.25 and len(kept) < 3 * 40 / 1.25
    else:
        assert mean_kept < 0.1  # the random head guesses nothing
