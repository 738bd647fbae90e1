"""Scheduler, pure Python: which sequences run in the next step and how many tokens each.

Running sequences go first (decodes, then unfinished prompt chunks), then waiting ones while
the token budget, state slots and KV blocks allow. A prompt longer than the budget is prefilled
in chunks across steps. While other sequences wait to be admitted, one prefill chunk takes at
most `long_prefill` tokens of a step (vLLM's long_prefill_token_threshold), so a long prompt
does not hold admissions back for its whole length; alone, it takes the whole budget. When
blocks run out for a running sequence, the most recently arrived one is preempted: its slot and
blocks are freed and it waits to be recomputed from its tokens.
"""

import time
from collections import deque
from dataclasses import dataclass

from qwen35_ray.engine.block_manager import CacheManager
from qwen35_ray.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    num_new: int  # tokens computed for seq in this step
    restore: int | None = None  # snapshot slot to copy into seq's slot before the step

    @property
    def completes(self) -> bool:
        """After this step every token of seq is computed, so it samples its next token."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        cache: CacheManager,
        max_num_batched_tokens: int,
        long_prefill_token_threshold: int | None = None,
        speculative_tokens: int = 0,
    ):
        """speculative_tokens: k of speculative decoding (engine/speculative.py), 0 without.
        A sequence's decode then computes its last token and k drafts (k + 1 of the budget),
        and whoever completes its tokens holds blocks for 2k positions past them."""
        self.cache = cache
        self.spec_k = speculative_tokens
        self.budget = max_num_batched_tokens
        self.long_prefill = long_prefill_limit(
            long_prefill_token_threshold, max_num_batched_tokens, cache.block_size
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prompt tokens looked up in the prefix cache at admission, and those it held
        # (vLLM's prefix_cache_queries / prefix_cache_hits)
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence that arrives with its cache already filled (an imported RequestState)."""
        need = seq.num_tokens + 2 * self.spec_k
        if not self.cache.can_grow(seq, need) or self.cache.slots.num_free == 0:
            raise RuntimeError("no free state slot or KV blocks for an imported request")
        self.cache.grow(seq, need)
        seq.status = Status.RUNNING
        seq.scheduled_time = seq.scheduled_time or time.monotonic()
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget = self.budget
        out: list[Scheduled] = []
        # decodes before prefill chunks, so a long prompt's chunk cannot take their budget
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed > 1):
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = self._chunk(seq, budget, cap=bool(self.waiting) and self.cache.slots.num_free > 0)
            end = seq.num_computed + n + self._lookahead(seq, seq.num_computed + n)
            while not self.cache.can_grow(seq, end):
                victim = self.running[-1]
                self._preempt(victim)
                # decodes go first, so the latest arrival may already be in this step
                budget += _unschedule(out, victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.cache.grow(seq, end)
            out.append(Scheduled(seq, n))
            # a verify row computes k drafts besides its token
            budget = max(0, budget - n - (self.spec_k if n == 1 and end > seq.num_tokens else 0))
        while self.waiting and budget > 0 and self.cache.slots.num_free > 0:
            seq = self.waiting[0]
            hit = self.cache.match(seq) if self.cache.prefix_caching else None
            start = hit.num_tokens if hit else 0
            n = self._chunk(seq, budget, start, cap=len(self.waiting) > 1)
            end = start + n + self._lookahead(seq, start + n)
            needed = -(-end // self.cache.block_size) - (len(hit.blocks) if hit else 0)
            # cached blocks nobody holds count as free; adopting them takes them off that count
            needed += sum(self.cache.blocks.ref[b] == 0 for b in hit.blocks) if hit else 0
            if needed > self.cache.blocks.num_free:
                break
            self.waiting.popleft()
            if self.cache.prefix_caching:
                self.prefix_cache_queries += len(seq.prompt_token_ids)
                self.prefix_cache_hits += hit.num_tokens if hit else 0
            if hit:
                self.cache.adopt(seq, hit)
            self.cache.grow(seq, end)
            seq.status = Status.RUNNING
            seq.scheduled_time = seq.scheduled_time or time.monotonic()
            self.running.append(seq)
            out.append(Scheduled(seq, n, hit.snapshot if hit else None))
            budget -= n
        # decodes first: the model runs them apart from prefill chunks (ForwardBatch.parts)
        out.sort(key=lambda s: not (s.num_new == 1 and s.seq.num_computed > 0))
        return out

    def _lookahead(self, seq: Sequence, computed: int) -> int:
        """Positions past `computed` that a step may write for seq: with speculative
        decoding, once its tokens are all computed, a verify and the head's drafts (2k)."""
        return 2 * self.spec_k if computed == seq.num_tokens else 0

    def _chunk(
        self, seq: Sequence, budget: int, start: int | None = None, cap: bool = False
    ) -> int:
        """Tokens to compute for seq now; a prefill pauses at each of its snapshot points.
        cap: others wait to be admitted, so a chunk takes at most `long_prefill` tokens."""
        start = seq.num_computed if start is None else start
        if cap and self.long_prefill:
            budget = min(budget, self.long_prefill)
        n = min(seq.num_tokens - start, budget)
        for point in seq.snapshot_points:
            if start < point:
                return min(n, point - start)
        return n

    def counters(self) -> dict:
        return {
            "preemptions_total": self.num_preemptions,
            "prefix_cache_queries_total": self.prefix_cache_queries,
            "prefix_cache_hits_total": self.prefix_cache_hits,
        }

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq)
        seq.num_computed = 0
        # the head's K/V went with the blocks: its drafts come anew after the recompute
        seq.drafts, seq.draft_probs = [], None
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """Take seq out of the queues and free its cache (finished, aborted or exported)."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq)


def _unschedule(out: list[Scheduled], seq: Sequence) -> int:
    """Take seq's entry out of this step's plan; return the tokens it had (0: none)."""
    for i, s in enumerate(out):
        if s.seq is seq:
            return out.pop(i).num_new
    return 0


def long_prefill_limit(threshold: int | None, budget: int, block_size: int) -> int:
    """The most tokens one prefill chunk takes while others wait; 0: no limit. None: an eighth
    of the step's budget, at least a block (vLLM's default is 4% of the context)."""
    if threshold is None:
        return max(block_size, budget // 8)
    if threshold < 0:
        raise ValueError(
            f"long_prefill_token_threshold={threshold} must be >= 0 (0 disables the limit)"
        )
    return threshold
