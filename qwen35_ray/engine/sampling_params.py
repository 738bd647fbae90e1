"""SamplingParams: how one request picks its tokens and when it stops."""

import random
from dataclasses import dataclass, field

# OpenAI's seed is a signed 64-bit integer
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# OpenAI's logit_bias values; -100 bans a token, 100 all but forces it
LOGIT_BIAS_MAX = 100.0
# below this temperature sampling is greedy, as in vLLM (_SAMPLING_EPS): dividing by a smaller
# one overflows the logits
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top logprobs per token; 0 = only the chosen token's
    skip_special_tokens: bool = True
    # a grammar the output must follow, engine/structured.py says which (JSON-serialisable)
    structured: dict | None = None
    # token id -> added to its logit before sampling (OpenAI semantics)
    logit_bias: dict[int, float] | None = None
    # tokens the output may write inside <think> before the engine forces </think>
    thinking_token_budget: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        checks = [
            (self.n >= 1, f"n={self.n} must be at least 1"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= -1, f"top_k={self.top_k} must be -1, 0 (all) or positive"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens={self.max_tokens} must be at least 1",
            ),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (
                self.thinking_token_budget is None or self.thinking_token_budget >= 0,
                f"thinking_token_budget={self.thinking_token_budget} must be >= 0",
            ),
            (
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                f"seed={self.seed} must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer)",
            ),
            (
                self.structured is None or isinstance(self.structured, dict),
                "structured must be a dict such as {'type': 'json_object'}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def output_seed(self, index: int) -> int:
        """The seed of output `index` of a request: its draws are token_seed(seed, position)."""
        if self.seed is None:
            return random.getrandbits(63)
        # output i of n draws from seed + i, wrapped to 64 bits
        return (self.seed + index) % 2**64


def _logit_bias(bias) -> dict[int, float]:
    """Keys as int token ids (a RequestState's JSON makes them strings), values in range."""
    if not isinstance(bias, dict):
        raise ValueError("logit_bias must be a map of token id to bias, such as {'42': -100}")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key) if not isinstance(key, (bool, float)) else None
        except ValueError:
            token = None
        if token is None or token < 0:
            raise ValueError(f"logit_bias key {key!r} must be a token id (an integer >= 0)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"logit_bias[{key}]={value!r} must be a number")
        if not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
            raise ValueError(
                f"logit_bias[{key}]={value} must be in [{-LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]"
            )
        out[token] = float(value)
    return out
