"""DPEngine: one engine over an expert-parallel group of N rank actors.

Attention and GDN are data-parallel: each rank runs its own sequences, so the driver keeps one
LLMEngine per rank (its scheduler, block accounting and requests; its model behind a
RankExecutor). The routed experts are expert-parallel, so the ranks step in lock step: every
step, each rank gets its batch, an idle rank an empty one, all sent before any is awaited.
Requests go to the least loaded rank; among ranks within NEAR_TIE of it, to the one whose
prefix cache holds most of the prompt.

It has the surface of LLMEngine that AsyncEngine, LLM and LLMServer use, plus expert_load(),
rank_info(), check_alive() and shutdown().
"""

import time

import ray

from qwen35_ray.distributed.executor import RankPending
from qwen35_ray.distributed.group import RankGroup
from qwen35_ray.engine.block_manager import block_hashes
from qwen35_ray.engine.errors import EngineDead, RequestError
from qwen35_ray.engine.executor import StepBatch
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.outputs import RequestOutput
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.engine.step_stats import StepCounters

# ranks whose load (running + waiting sequences) is within this of the least loaded one's
# compete on their prefix-cache hit: a cached prefix is worth a slightly longer queue
NEAR_TIE = 2


class DPEngine:
    def __init__(self, engines: list[LLMEngine], group: RankGroup):
        self.engines = engines
        self.group = group
        e = engines[0]
        self.config, self.tokenizer, self.dtype = e.config, e.tokenizer, e.dtype
        self.max_model_len, self.fingerprint = e.max_model_len, e.fingerprint
        self.generation_defaults, self.eos_token_ids = e.generation_defaults, e.eos_token_ids
        self._rank_of: dict[str, int] = {}
        # the failure that killed the group: every later step raises it again
        self._dead: EngineDead | None = None
        # the group's steps: the ranks step together, so their own counters stay at zero
        self.step_counters = StepCounters()

    @property
    def size(self) -> int:
        return len(self.engines)

    def rank_of(self, request_id: str) -> int | None:
        return self._rank_of.get(request_id)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return self.engines[0].default_sampling_params(**overrides)

    def check_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume_token_ids: list[int] | None = None,
        resume_logprobs: list | None = None,
    ) -> None:
        self.engines[0].check_request(prompt_token_ids, params, resume_token_ids, resume_logprobs)

    def check_import(self, state: RequestState) -> None:
        self.engines[0].check_import(state)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        prefill_only: bool = False,
        resume_token_ids: list[int] | None = None,
        resume_logprobs: list | None = None,
        images: list | None = None,
    ) -> None:
        """LLMEngine.add_request on the rank _pick chooses (whose executor runs no vision
        tower yet: a request with images gets its RequestError)."""
        if request_id in self._rank_of:
            raise RequestError(f"request id {request_id!r} is already in use")
        rank = self._pick(prompt_token_ids)
        self.engines[rank].add_request(
            request_id,
            prompt_token_ids,
            params,
            prompt,
            prefill_only,
            resume_token_ids,
            resume_logprobs,
            images,
        )
        self._rank_of[request_id] = rank

    def can_import(self, state: RequestState) -> bool:
        return any(e.can_import(state) for e in self.engines)

    def import_request(self, state: RequestState) -> None:
        if state.request_id in self._rank_of:
            raise ValueError(f"request id {state.request_id!r} is already in use")
        ranks = [r for r, e in enumerate(self.engines) if e.can_import(state)]
        # none has room: the least loaded one raises the engine's own error
        rank = min(ranks or range(self.size), key=lambda r: (self._load(r), r))
        self.engines[rank].import_request(state)
        self._rank_of[state.request_id] = rank

    def abort(self, request_id: str) -> None:
        rank = self._rank_of.pop(request_id, None)
        if rank is not None:
            self.engines[rank].abort(request_id)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def step(self) -> list[RequestOutput]:
        if self._dead is not None:
            raise self._dead
        start, cpu = time.perf_counter(), time.thread_time()
        plans = [e.prepare_step() for e in self.engines]
        if all(p is None for p in plans):
            return []
        # every rank's batch goes out before any is awaited: they meet in collectives
        pending = [
            e.executor.submit(p.batch if p is not None else idle_batch())
            for e, p in zip(self.engines, plans)
        ]
        try:
            results = gather(pending)
        except EngineDead as e:
            self._dead = e
            raise
        outs = []
        for engine, plan, result in zip(self.engines, plans, results):
            if plan is not None:
                outs.extend(engine.finish_step(plan, result))
        for out in outs:
            if out.finished or out.request_state is not None:
                self._rank_of.pop(out.request_id, None)
        decodes = any(p is not None and p.num_decodes for p in plans)
        self.step_counters.record(time.perf_counter() - start, decodes, time.thread_time() - cpu)
        return outs

    def load_stats(self) -> dict:
        """LLMEngine.load_stats() summed over the ranks; the step counters are the group's."""
        per_rank = self.rank_load_stats()
        summed = {k: sum(s[k] for s in per_rank) for k in per_rank[0]}
        return summed | self.step_counters.stats()

    def rank_load_stats(self) -> list[dict]:
        return [e.load_stats() for e in self.engines]

    def expert_load(self):
        """Tokens routed to each expert, per MoE layer, over the window: every rank's own
        tokens, added up (ExpertLoadSnapshot)."""
        from qwen35_ray.model.expert_load import ExpertLoadSnapshot

        snaps = self._get_all([e.executor.actor.expert_load.remote() for e in self.engines])
        return ExpertLoadSnapshot.merge(snaps)

    def rank_info(self) -> list[dict]:
        """Per rank: expert range and bytes, node, all-to-all bytes and seconds so far."""
        return self._get_all([e.executor.actor.info.remote() for e in self.engines])

    def check_alive(self, timeout_s: float = 10.0) -> None:
        """Raise EngineDead naming a rank that is gone or does not answer in timeout_s."""
        if self._dead is not None:
            raise self._dead
        refs = [e.executor.ping() for e in self.engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for rank, ref in enumerate(refs):
            if ref not in ready:
                raise EngineDead(f"expert-parallel rank {rank} did not answer in {timeout_s} s")
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                raise self.engines[rank].executor.dead(e, "a health check") from e

    def shutdown(self) -> None:
        self.group.kill()

    def _get_all(self, refs: list) -> list:
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as e:
            raise EngineDead(f"an expert-parallel rank failed: {e}") from e

    def _load(self, rank: int) -> int:
        s = self.engines[rank].scheduler
        return len(s.running) + len(s.waiting)

    def _pick(self, prompt_token_ids: list[int]) -> int:
        """The least loaded rank; among those within NEAR_TIE of it, the longest prefix-cache
        hit, then the lighter load, then the lower rank."""
        loads = [self._load(r) for r in range(self.size)]
        near = [r for r in range(self.size) if loads[r] <= min(loads) + NEAR_TIE]
        cm = self.engines[0].cache_manager
        if len(near) == 1 or not cm.prefix_caching:
            return min(near, key=lambda r: (loads[r], r))
        # the blocks match() could reuse: full blocks before the prompt's last token
        n = (len(prompt_token_ids) - 1) // cm.block_size
        hashes = block_hashes(prompt_token_ids, cm.block_size, n)
        hits = {r: _cached_blocks(self.engines[r].cache_manager, hashes) for r in near}
        return min(near, key=lambda r: (-hits[r], loads[r], r))


def _cached_blocks(cm, hashes: list[bytes]) -> int:
    for i, h in enumerate(hashes):
        if h not in cm.blocks.by_hash:
            return i
    return len(hashes)


def idle_batch() -> StepBatch:
    return StepBatch()


def gather(pending: list[RankPending]) -> list:
    """Every rank's StepResult. The first rank to fail raises at once: its peers may be
    blocked in a collective with it and would never answer."""
    by_ref = {p.ref: p for p in pending}
    waiting = list(by_ref)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        for ref in ready:
            by_ref[ref].result()
    return [p.result() for p in pending]
