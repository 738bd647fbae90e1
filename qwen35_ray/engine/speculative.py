"""Speculative decoding with the checkpoint's own MTP head (issue 22): its configuration.

`{"method": "mtp", "num_speculative_tokens": k}`: every decode step of a running sequence
verifies its last token and k drafts of the MTP head in one forward of the main model, keeps the
drafts the acceptance rule takes (engine/spec_accept.py) and rolls the GDN states back to the
last kept token (model/verify.py). The step itself is engine/spec_step.py.
"""

import json
from dataclasses import dataclass

# what vLLM (qwen3_next_mtp, qwen3_5_mtp, mtp) and SGLang (nextn) call the checkpoint's own head
MTP_METHODS = ("mtp", "qwen3_next_mtp", "qwen3_5_mtp", "nextn")
MAX_SPECULATIVE_TOKENS = 4
# keys of vLLM's --speculative-config that say nothing here beyond what they say there
_KNOWN = {"method", "num_speculative_tokens"}


@dataclass(frozen=True)
class SpeculativeConfig:
    num_speculative_tokens: int
    method: str = "mtp"

    def __post_init__(self):
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative.num_speculative_tokens={k!r} must be an integer from 1 to "
                f"{MAX_SPECULATIVE_TOKENS}"
            )
        if not isinstance(self.method, str) or self.method.lower() not in MTP_METHODS:
            raise ValueError(
                f"speculative.method={self.method!r} is not supported: the drafts come from the "
                f"checkpoint's own MTP head ({', '.join(MTP_METHODS)})"
            )

    @property
    def k(self) -> int:
        return self.num_speculative_tokens

    @property
    def lookahead(self) -> int:
        """KV positions past a sequence's last computed token that one speculative step may
        write: its verify (k + 1 positions) and the head's recursive drafts after the kept
        ones (k - 1 more past the verify's kept positions): at most 2k."""
        return 2 * self.k

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, a dict or its JSON text (vLLM's --speculative-config)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative: {value!r} is not JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(
                f"speculative must be a mapping like {{'method': 'mtp', "
                f"'num_speculative_tokens': 2}}, got {type(value).__name__}"
            )
        if unknown := sorted(set(value) - _KNOWN):
            raise ValueError(
                f"speculative: {', '.join(unknown)} not supported; give method and "
                "num_speculative_tokens only"
            )
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative: num_speculative_tokens is required (1 to 4)")
        return cls(value["num_speculative_tokens"], value.get("method", "mtp"))
