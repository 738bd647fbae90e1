"""/v1/completions: a request's prompts as token ids, and the engine's outputs back as
OpenAI text completions, whole or streamed. A request with k prompts and n outputs each has
choices indexed k * n + i."""

import itertools
import time
import uuid

from qwen35_ray.serving import limits
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.protocol import CompletionRequest
from qwen35_ray.serving.streams import merge, usage


def completion_prompts(tokenizer, req: CompletionRequest) -> list[list[int]]:
    """Every prompt tokenized and checked, before any starts."""
    prompts = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in req.prompts()]
    if any(not ids for ids in prompts):
        raise OpenAIError("prompt is empty", param="prompt")
    total = sum(map(len, prompts))
    if total > limits.MAX_TOTAL_PROMPT_TOKENS:
        raise OpenAIError(
            f"the prompts have {total} tokens together; one request may bring at most "
            f"{limits.MAX_TOTAL_PROMPT_TOKENS}; split them over several requests",
            param="prompt",
        )
    return prompts


def completion_response(tokenizer, model: str, req, prompts, results) -> dict:
    """results: per prompt, collect()'s (texts, tokens, logprobs, finish reasons)."""
    choices, counts = [], []
    for k, (texts, tokens, lps, reasons) in enumerate(results):
        for i in range(req.n):
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, tokens[i], lps[i])
            choices.append(
                {
                    "index": k * req.n + i,
                    "text": texts[i],
                    "finish_reason": reasons[i],
                    "logprobs": logprobs,
                }
            )
            counts.append(len(tokens[i]))
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(sum(map(len, prompts)), sum(counts)),
    }


async def completion_chunks(tokenizer, model: str, req, prompts, streams):
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    counts = [0] * (len(streams) * req.n)
    async for k, step in merge(streams):
        for d in step["outputs"]:
            i = k * req.n + d["index"]
            counts[i] += len(d["token_ids"])
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, d["token_ids"], d["logprobs"])
            choice = {
                "index": i,
                "text": d["text"],
                "finish_reason": d["finish_reason"],
                "logprobs": logprobs,
            }
            yield {**head, "choices": [choice]}
    if req.stream_options and req.stream_options.include_usage:
        yield {**head, "choices": [], "usage": usage(sum(map(len, prompts)), sum(counts))}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict]) -> dict:
    tokens = [tokenizer.decode([t]) for t in token_ids]
    return {
        "tokens": tokens,
        "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs)],
        "top_logprobs": [{tokenizer.decode([k]): v for k, v in lp.items()} for lp in logprobs],
        "text_offset": list(itertools.accumulate(map(len, tokens), initial=0))[:-1],
    }
