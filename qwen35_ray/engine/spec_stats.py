"""Counters of speculative decoding (issue 22), vLLM's spec_decode metrics: of the verify rows
that may keep drafts, how many ran (drafts), the draft tokens they verified, those kept, and
those kept at each draft position. Mean accept length = 1 + accepted / drafts: tokens per
verify row; the acceptance rate at position i = accepted_per_pos[i] / drafts."""

from qwen35_ray.engine.speculative import SpeculativeConfig


class SpecCounters:
    def __init__(self, spec: SpeculativeConfig | None):
        self.k = spec.k if spec else 0
        self.drafts = self.draft_tokens = self.accepted = 0
        self.accepted_per_pos = [0] * self.k

    def record(self, spec_batch, index: int, kept: int) -> None:
        """Chunk `index` of a speculative step kept `kept` drafts; only verify rows that may
        keep drafts count (the others verify filler and keep none by construction)."""
        row = index - spec_batch.num_prompt_chunks
        if row < 0 or not spec_batch.keeps[row]:
            return
        self.drafts += 1
        self.draft_tokens += self.k
        self.accepted += kept
        for i in range(kept):
            self.accepted_per_pos[i] += 1

    def stats(self) -> dict:
        if not self.k:
            return {}
        return {
            "spec_decode_num_drafts_total": self.drafts,
            "spec_decode_num_draft_tokens_total": self.draft_tokens,
            "spec_decode_num_accepted_tokens_total": self.accepted,
            "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos),
        }

    def mean_accept_length(self) -> float | None:
        return 1 + self.accepted / self.drafts if self.drafts else None
