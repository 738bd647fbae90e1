"""Sequence: one generation stream of a request and the cache it holds while it runs."""

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from qwen35_ray.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is an entity: identity, not field-by-field equality
class Sequence:
    request_id: str
    index: int  # which of the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    # its draws use sampler.token_seed(seed, output position): a fresh generator per token
    seed: int
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV / GDN state is in the cache
    slot: int | None = None
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    arrival: int = 0
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    snapshot_points: list[int] = field(default_factory=list)  # prompt boundaries to snapshot
    prefill_only: bool = False  # export a RequestState once the first token is sampled
    grammar: Any = None  # structured.Grammar: where a constrained output is in its grammar
    thinking: Any = None  # reasoning.ThinkingBudget, made at the first sample when one is set
    # images.PromptImages of a prompt with images (None for text), and the rotary position
    # offset of every token past the prompt (model/mrope.py; it travels in a RequestState)
    images: Any = None
    rope_delta: int = 0
    # time.monotonic() when it entered this engine, and when a step first scheduled it: the
    # queue time of serving's metrics
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    # speculative decoding: the MTP head's drafts of the tokens after the last one
    drafts: list[int] = field(default_factory=list)
    draft_probs: Any = None  # [k, V] the distributions they were drawn from (sampled only)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        return (
            self.prompt_token_ids[start:end]
            if end <= p
            else (self.prompt_token_ids + self.output_token_ids)[start:end]
        )

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def exposed_text(self) -> str:
        """The text an output shows. While it runs, a tail that could still begin a stop string
        is held back (at most the longest stop less one character), so the text shown only
        grows and the finished text, cut before its stop string, starts with everything shown
        before."""
        text = self.text
        if self.is_finished or not self.params.stop:
            return text
        held = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return text[: len(text) - held]
