"""Engines over small random transformers checkpoints, with transformers as the oracle."""

import torch
import transformers
from hf_reference import hf_model, save

from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.loader import load_model


def checkpoint(kind, tmp_path_factory):
    ref = hf_model(kind)
    return ref, save(ref, tmp_path_factory.mktemp(kind))


def make_engine(path, tokenizer, **kw) -> LLMEngine:
    model, config, _ = load_model(path, dtype="float32", progress=False)
    return LLMEngine(model, config, tokenizer, EngineConfig(**kw), path)


def tiny_tokenizer(tmp_path_factory):
    """Any tokenizer will do for token-id tests; the embedded one is at hand."""
    from qwen35_ray.model.tiny.tokenizer import write_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return transformers.AutoTokenizer.from_pretrained(out)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def prompt(n: int, seed: int, vocab: int = 300) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_greedy(ref, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, each token from a full forward over the prefix.

    Not `generate()`: in transformers 5.23 its cached decode of qwen3_5_moe drifts from its own
    uncached forward (seen: a different argmax at a 0.03 logit gap on a 53-token prompt), and
    the uncached forward is the definition we hold ourselves to.
    """
    out = list(ids)
    for _ in range(n):
        out.append(int(ref(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]
