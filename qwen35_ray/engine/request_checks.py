"""The checks a request passes before an engine queues it: each failure a RequestError (a
ValueError, the client's 400) that says what to change."""

from qwen35_ray.engine.errors import RequestError
from qwen35_ray.engine.reasoning import ThinkTokens, check_budget
from qwen35_ray.engine.resume import check_resume
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.engine.structured import StructuredOutputs


def check_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    vocab: int,
    max_model_len: int,
    think: ThinkTokens | None,
    structured: StructuredOutputs,
    resume_token_ids: list[int] | None = None,
    resume_logprobs: list | None = None,
) -> None:
    n = len(prompt_token_ids)
    if n == 0:
        raise RequestError("the prompt is empty; give at least one token")
    if bad := [t for t in prompt_token_ids if not 0 <= t < vocab]:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary of {vocab} tokens")
    room = max_model_len - n
    if room < 1:
        raise RequestError(
            f"the prompt has {n} tokens; the context of this model is "
            f"{max_model_len}; shorten the prompt"
        )
    if params.max_tokens is not None and params.max_tokens > room:
        raise RequestError(
            f"max_tokens={params.max_tokens} with a {n}-token prompt exceeds the "
            f"{max_model_len}-token context; lower max_tokens or shorten the prompt"
        )
    if bad := [t for t in params.logit_bias or {} if not 0 <= t < vocab]:
        raise RequestError(f"logit_bias has token id {bad[0]}; token ids must be in [0, {vocab})")
    check_budget(think, params.thinking_token_budget)
    check_resume(params, n, resume_token_ids, resume_logprobs, vocab, max_model_len)
    if params.structured is not None:
        try:
            structured.compile(params.structured)
        except ValueError as e:
            raise RequestError(str(e)) from e
