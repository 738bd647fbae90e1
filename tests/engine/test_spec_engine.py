"""Speculative decoding with the MTP head in the engine (issue 22): whatever the drafts, every
request's output is the engine's output without speculation, token for token.

The checkpoints are the embedded tiny ones (MoE and dense) with their MTP head distilled from a
chained main model (model/mtp_distill.py), so that drafts are kept and the paths that keep them
run. One workload holds what a step can mix: 16 requests of mixed prompt lengths submitted
together into a small token budget (prompt chunks beside verify rows), a cache so small that
sequences are preempted, three requests sharing a prefix that the second and third find in the
prefix cache, a JSON schema, stop strings, a stop token and max_tokens that can end a request
inside its kept drafts, and rows that keep no drafts (n>1 sampled with a seed, a penalty,
logprobs). Sampling is stateless per seed and position, so those equal too. A second test
counts the steps kept drafts save; the last ones check the settings speculative refuses.
"""

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from json_schemas import PERSON
from PIL import Image

from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mtp_distill import ordinary_token_ids
from qwen35_ray.model.source import resolve_model

CHECKPOINTS = {"moe": "qwen35-tiny", "dense": "qwen35-tiny-dense"}
# a short distillation (as tests/model/test_spec_decode_loop.py): about a third of first
# drafts kept
# prompts split into chunks of at most 32 tokens; 24 blocks of 16 hold about a third of what
# the workload's sequences need at once
ENGINE = dict(
    dtype="float32", max_model_len=256, max_num_batched_tokens=32, block_size=16,
    num_kv_blocks=24,
)  # fmt: skip
PREFIX = 48  # tokens the three sharers have in common: three blocks
SHARERS = ["share0", "share1", "share2"]


def speculative(k: int) -> dict:
    return {"speculative": {"method": "mtp", "num_speculative_tokens": k}}


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **{"max_tokens": 32, **kw})


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, chain_checkpoint):
    return str(chain_checkpoint(CHECKPOINTS[request.param]))


@pytest.fixture(scope="module")
def workload(checkpoint):
    return build_workload(checkpoint)


def build_workload(checkpoint) -> dict:
    """{request id: (prompt, params)} in submission order; the last two sharers are added
    later (run_workload)."""
    vocab = ordinary_token_ids(checkpoint)
    g = torch.Generator().manual_seed(42)
    prompt = lambda n: vocab[torch.randint(len(vocab), (n,), generator=g)].tolist()
    plain = {f"greedy{n}": (prompt(n), greedy()) for n in (5, 11, 37, 70)}
    # two greedy siblings: the same tokens, each from drafts of its own
    plain["greedy_n2"] = (prompt(23), greedy(n=2))
    # stops taken from what the prompts continue with, so that they trigger
    stop_prompt, stop_token_prompt = prompt(19), prompt(26)
    probe = LLMEngine.from_pretrained(checkpoint, **ENGINE)
    ref = generate(probe, {"a": (stop_prompt, greedy()), "b": (stop_token_prompt, greedy())})
    text, ids = ref["a"].outputs[0].text, ref["b"].outputs[0].token_ids
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"no stop string in {text!r}"
    sampled = SamplingParams(n=3, temperature=0.9, top_p=0.95, seed=11, max_tokens=24, logprobs=1)
    schema = {"type": "json_schema", "schema": PERSON}
    others = {
        "max7": (prompt(9), greedy(max_tokens=7)),
        "max10": (prompt(30), greedy(max_tokens=10)),
        "stop": (stop_prompt, greedy(stop=[stop])),
        "stop_token": (stop_token_prompt, greedy(stop_token_ids=[ids[12]])),
        "json": (prompt(14), greedy(max_tokens=60, structured=schema)),
        "sampled": (prompt(17), sampled),
        "penalty": (prompt(21), greedy(repetition_penalty=1.3)),
        "logprobs": (prompt(8), greedy(logprobs=2)),
    }
    shared = prompt(PREFIX)
    sharers = {rid: (shared + prompt(n), greedy()) for rid, n in zip(SHARERS, (5, 9, 20))}
    return {**plain, **others, **sharers}


def generate(engine: LLMEngine, requests: dict) -> dict:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    return drain(engine)


def drain(engine: LLMEngine, later=(), after=None) -> dict:
    """Step until done: {request id: its final output}. Each of `later` (id, prompt, params)
    is added once request `after`, then the one added before it, has a token."""
    done, later = {}, list(later)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            if later and out.request_id == after and out.outputs[0].token_ids:
                after, ids, params = later.pop(0)
                engine.add_request(after, ids, params)
            if out.finished:
                done[out.request_id] = out
    return done


class StepSpy:
    """Counts, from each step's plan and result, the speculative steps that ran prompt chunks
    beside verify rows, and the sequences a stop or max_tokens ended inside their kept
    drafts (fewer tokens appended than the step emitted for them)."""

    def __init__(self, engine: LLMEngine):
        self.mixed, self.cut = 0, set()
        self.finish_step = engine.finish_step
        engine.finish_step = self

    def __call__(self, plan, result):
        spec = plan.batch.spec
        if spec is not None and 0 < spec.num_prompt_chunks < len(plan.batch.chunks):
            self.mixed += 1
        seqs = {i: plan.scheduled[i].seq for i in result.tokens}
        before = {i: len(s.output_token_ids) for i, s in seqs.items()}
        outs = self.finish_step(plan, result)
        for i, s in seqs.items():
            emitted = 1 + len(result.more.get(i, []))
            if s.is_finished and len(s.output_token_ids) - before[i] < emitted:
                self.cut.add(s.request_id)
        return outs


def run_workload(checkpoint, workload, **kw) -> tuple[dict, dict, StepSpy]:
    """(finished outputs by request id, load_stats, StepSpy) of the workload on a new engine."""
    engine = LLMEngine.from_pretrained(checkpoint, **ENGINE, **kw)
    spy = StepSpy(engine)
    for rid, (ids, params) in workload.items():
        if rid not in SHARERS[1:]:
            engine.add_request(rid, ids, params)
    later = [(r, *workload[r]) for r in SHARERS[1:]]
    done = drain(engine, later, after=SHARERS[0])
    return done, engine.load_stats(), spy


@pytest.fixture(scope="module")
def baseline(checkpoint, workload):
    return run_workload(checkpoint, workload)[0]


def assert_same_outputs(got: dict, want: dict) -> None:
    """Token ids, text and finish reason of every output; logprobs to float tolerance (the
    verify forward and a decode sum in different orders)."""
    assert sorted(got) == sorted(want)
    for rid in want:
        a, b = want[rid].outputs, got[rid].outputs
        assert [o.token_ids for o in b] == [o.token_ids for o in a], rid
        assert [o.finish_reason for o in b] == [o.finish_reason for o in a], rid
        assert [o.text for o in b] == [o.text for o in a], rid
        for x, y in zip(a, b):
            assert (x.logprobs is None) == (y.logprobs is None), rid
            assert len(x.logprobs or []) == len(y.logprobs or []), rid
            for p, q in zip(x.logprobs or [], y.logprobs or []):
                assert p.keys() == q.keys(), rid
                assert list(q.values()) == pytest.approx(list(p.values()), abs=1e-4), rid


def assert_spec_counters(stats: dict, k: int) -> None:
    per_pos = stats["spec_decode_num_accepted_tokens_per_pos"]
    assert len(per_pos) == k and sum(per_pos) == stats["spec_decode_num_accepted_tokens_total"]
    assert stats["spec_decode_num_draft_tokens_total"] == k * stats["spec_decode_num_drafts_total"]
    assert stats["spec_decode_num_accepted_tokens_total"] > 0
    # a draft is kept only after every draft before it
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_outputs_equal_the_engine_without_speculation(checkpoint, workload, baseline, k):
    got, stats, spy = run_workload(checkpoint, workload, **speculative(k))
    assert_same_outputs(got, baseline)
    # the workload did what it is here for
    assert spy.mixed > 0, "no step ran prompt chunks beside verify rows"
    assert stats["preemptions_total"] > 0
    # the second and third sharers found the first's blocks and state (a preempted sequence
    # may find more: its own prompt, computed before)
    assert stats["prefix_cache_hits_total"] > 0
    assert all(got[r].num_cached_tokens >= PREFIX for r in SHARERS[1:])
    jsonschema.validate(json.loads(got["json"].outputs[0].text), PERSON)
    reasons = {r: got[r].outputs[0].finish_reason for r in ("json", "stop", "stop_token")}
    assert reasons == dict.fromkeys(reasons, "stop")
    assert got["max7"].outputs[0].finish_reason == "length"
    assert spy.cut, "no request ended inside its kept drafts"
    assert_spec_counters(stats, k)


def test_kept_drafts_take_fewer_steps(checkpoint):
    """With room in the budget, kept drafts save steps: the same tokens in fewer steps."""
    vocab = ordinary_token_ids(checkpoint)
    g = torch.Generator().manual_seed(7)
    prompts = [vocab[torch.randint(len(vocab), (n,), generator=g)].tolist() for n in (6, 17, 40)]
    requests = {f"r{i}": (p, greedy(max_tokens=40, ignore_eos=True)) for i, p in enumerate(prompts)}

    def run(**kw):
        engine = LLMEngine.from_pretrained(
            checkpoint, dtype="float32", max_model_len=256, num_kv_blocks=64, **kw
        )
        return generate(engine, requests), engine.load_stats()

    want, plain = run()
    for k in (1, 2, 3):
        got, stats = run(**speculative(k))
        assert_same_outputs(got, want)
        assert_spec_counters(stats, k)
        assert stats["steps_total"] < plain["steps_total"], k


def test_prompts_with_images(checkpoint):
    """Prompt chunks holding an image's tokens (its vision tower's embeddings, multimodal
    positions) run beside verify rows, chunked; the head passes over them with the pads'
    token embeddings; the decodes after them continue at their rope delta."""
    vocab = ordinary_token_ids(checkpoint).tolist()
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    start, pad, end = (config[f"{n}_token_id"] for n in ("vision_start", "image", "vision_end"))
    g = torch.Generator().manual_seed(8)
    pixels = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
              for w, h in ((64, 64), (96, 64), (64, 96))]  # fmt: skip
    images = [Image.fromarray(p) for p in pixels]
    tag = [start, pad, end]
    requests = {
        "one": (vocab[:5] + tag + vocab[5:20], images[:1]),
        "text": (vocab[30:40], []),
        "two": (tag + vocab[50:60] + tag + vocab[60:63], images[1:]),
    }
    params = greedy(max_tokens=20, ignore_eos=True)
    outs = []
    for kw in ({}, speculative(2)):
        engine = LLMEngine.from_pretrained(
            checkpoint, dtype="float32", max_num_batched_tokens=24, **kw
        )
        for rid, (ids, imgs) in requests.items():
            engine.add_request(rid, ids, params, images=imgs or None)
        outs.append(drain(engine))
    assert_same_outputs(outs[1], outs[0])


def test_a_resumed_request_continues_as_without_speculation(checkpoint):
    """Migration resumes a stream on another replica from the tokens it already sent
    (resume_token_ids): the resumed sequence has no drafts yet (its last token repeated
    stands in, kept only where right) and its output is plain decoding's."""
    prompt = ordinary_token_ids(checkpoint)[:20].tolist()
    params = greedy(max_tokens=30, ignore_eos=True)
    plain = LLMEngine.from_pretrained(checkpoint, dtype="float32")
    plain.add_request("r", prompt, params)
    want = drain(plain)["r"].outputs[0].token_ids
    engine = LLMEngine.from_pretrained(checkpoint, dtype="float32", **speculative(2))
    engine.add_request("r", prompt, params, resume_token_ids=want[:11])
    assert drain(engine)["r"].outputs[0].token_ids == want
    assert engine.load_stats()["spec_decode_num_accepted_tokens_total"] > 0


@pytest.fixture(scope="module")
def without_mtp(tmp_path_factory):
    """The embedded MoE checkpoint with its config saying it has no MTP layer."""
    out = tmp_path_factory.mktemp("no_mtp") / "ckpt"
    shutil.copytree(resolve_model("qwen35-tiny"), out)
    config = json.loads((out / "config.json").read_text())
    config.get("text_config", config)["mtp_num_hidden_layers"] = 0
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_checkpoint_without_mtp_is_refused_naming_speculative(without_mtp):
    with pytest.raises(ValueError, match="speculative: .*MTP layer.*leave speculative out"):
        LLMEngine.from_pretrained(without_mtp, dtype="float32", **speculative(2))
    # a model built without its head, given to the engine
    net, config, path = load_model("qwen35-tiny", dtype="float32", progress=False)
    with pytest.raises(ValueError, match="speculative: .*MTP layer"):
        LLMEngine(net, config, None, EngineConfig(**speculative(1)), path)


def test_cuda_graphs_with_speculative_is_refused():
    """The captured graphs are of the one-token decode step, which a speculative engine never
    runs; compile_decode=True instead compiles its verify step (engine/verify_graph.py)."""
    with pytest.raises(ValueError, match="cuda_graphs=True .*speculative"):
        EngineConfig(cuda_graphs=True, **speculative(2))
