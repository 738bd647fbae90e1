"""Resuming a request from the output tokens it already has (a stream migrated off a replica
that died or drained).

The resumed sequence starts with those tokens as its output: they are computed with the prompt
as its prefill, and the grammar, detokenizer, thinking budget, penalties, stop checks and
max_tokens see them as if it had sampled them here (LLMEngine._replay). Sampling is stateless
per token (sampler.token_seed), so a seeded request then draws what it would have drawn.

What the tokens could not continue is refused here, before the request is queued: n > 1, token
ids outside the vocabulary, logprobs that do not match, and a request those tokens already
completed (max_tokens or the context reached).
"""

import math

from qwen35_ray.engine.errors import RequestError
from qwen35_ray.engine.sampling_params import SamplingParams


def check_resume(
    params: SamplingParams,
    num_prompt: int,
    token_ids: list[int] | None,
    logprobs: list | None,
    vocab_size: int,
    max_model_len: int,
) -> None:
    """Raise RequestError, saying what to change, for resume tokens this request cannot
    continue from. None: not a resume."""
    if token_ids is None:
        if logprobs is not None:
            raise RequestError("resume_logprobs needs resume_token_ids; give both or neither")
        return
    k = len(token_ids)
    if params.n != 1:
        raise RequestError(
            f"resume_token_ids needs n=1, got n={params.n}; resume each output as a request "
            "of its own"
        )
    if bad := [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]:
        raise RequestError(
            f"resume_token_ids holds token id {bad[0]!r}, outside the vocabulary of "
            f"{vocab_size} tokens"
        )
    if params.max_tokens is not None and k >= params.max_tokens:
        raise RequestError(
            f"resume_token_ids has {k} tokens and max_tokens={params.max_tokens}: the request "
            "is already complete (finish_reason 'length'); there is nothing to resume"
        )
    if num_prompt + k >= max_model_len:
        raise RequestError(
            f"the {num_prompt}-token prompt and {k} resume_token_ids fill the "
            f"{max_model_len}-token context: the request is already complete (finish_reason "
            "'length'); there is nothing to resume"
        )
    want = k if params.logprobs is not None else 0
    got = len(logprobs or [])
    if got != want:
        raise RequestError(
            f"resume_logprobs has {got} entries for {k} resume_token_ids with "
            f"logprobs={params.logprobs}; give one per token when logprobs is set, else none"
        )
    normalized_logprobs(logprobs, params.logprobs, vocab_size)


def normalized_logprobs(
    logprobs: list | None, top: int | None, vocab_size: int
) -> list[dict[int, float]]:
    """resume_logprobs as the engine keeps them ({token id: logprob} per token; JSON makes the
    keys strings). Each entry holds the chosen token and at most `top` others."""
    out = []
    for i, entry in enumerate(logprobs or []):
        try:
            d = {int(t): float(v) for t, v in entry.items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise RequestError(
                f"resume_logprobs[{i}] must map token ids to logprobs ({type(e).__name__})"
            ) from e
        if len(d) > (top or 0) + 1:
            raise RequestError(
                f"resume_logprobs[{i}] has {len(d)} entries; logprobs={top} gives at most "
                f"{(top or 0) + 1}"
            )
        if any(not 0 <= t < vocab_size or math.isnan(v) or v == math.inf for t, v in d.items()):
            raise RequestError(
                f"resume_logprobs[{i}] holds a token id outside [0, {vocab_size}) or a "
                "logprob that is nan or inf"
            )
        out.append(d)
    return out
