"""What generate() returns, shaped like vLLM's outputs."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    # "stop", "length", "abort", "error" (see RequestOutput.error) or None while running
    finish_reason: str | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    # set when a prefill-only request has sampled its first token and left this engine
    request_state: object | None = None
    # why the request failed (errors.RequestError or RequestFailed); it is then finished
    error: Exception | None = None
    # seconds from entering the engine to its first scheduled step; None until scheduled
    queue_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
