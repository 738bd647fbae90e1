"""RankExecutor: the Executor protocol (engine/executor.py) over one rank actor.

The driver's LLMEngine for rank r talks to it exactly as to an InProcessExecutor. Slot copies
are queued and travel with the next call, which keeps them in program order without a round
trip each. A rank that died, or a step that failed on it, is EngineDead naming the rank.
"""

import dataclasses
from concurrent.futures import Future

import ray

from qwen35_ray.engine.errors import EngineDead
from qwen35_ray.engine.executor import StepBatch, StepResult


class FailedMasks:
    """Stands for the masks of a step whose fill raised: the rank's runner fails the
    constrained rows on reading it, as it would on the Future in process."""

    def __init__(self, error: Exception):
        self.error = error

    @property
    def bitmask(self):
        raise self.error


def resolved(masks):
    """A Future of grammar masks waited for here: a Future does not pickle."""
    if not isinstance(masks, Future):
        return masks
    try:
        return masks.result()
    except Exception as e:
        return FailedMasks(e)


class RankPending:
    """One submitted step; result() waits for it."""

    def __init__(self, executor: "RankExecutor", ref: ray.ObjectRef, batch: StepBatch):
        self.executor, self.ref, self.batch = executor, ref, batch
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        if self._result is None:
            try:
                self._result = ray.get(self.ref)
            except Exception as e:
                raise self.executor.dead(e, "a step") from e
        return self._result


class RankExecutor:
    def __init__(self, actor, rank: int):
        self.actor, self.rank = actor, rank
        self._copies: list[tuple[int, int]] = []

    def _take_copies(self) -> list[tuple[int, int]]:
        copies, self._copies = self._copies, []
        return copies

    def dead(self, e: BaseException, what: str) -> EngineDead:
        """The EngineDead that `e`, raised by `what` on this rank, means for the engine."""
        if isinstance(e, ray.exceptions.RayActorError):
            return EngineDead(f"expert-parallel rank {self.rank} died during {what}")
        # the remote traceback stays in the chain (raise ... from e), out of the message
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
        return EngineDead(f"expert-parallel rank {self.rank} failed in {what}: {cause!r}")

    def submit(self, batch: StepBatch) -> RankPending:
        if batch.masks is not None:
            batch = dataclasses.replace(batch, masks=resolved(batch.masks))
        try:
            ref = self.actor.step.remote(self._take_copies(), batch)
        except Exception as e:
            raise self.dead(e, "a step") from e
        return RankPending(self, ref, batch)

    def execute(self, batch: StepBatch) -> StepResult:
        return self.submit(batch).result()

    def copy_slot(self, src: int, dst: int) -> None:
        self._copies.append((src, dst))

    def read_state(self, slot: int, block_table: list[int], num_tokens: int) -> dict:
        ref = self.actor.read_state.remote(self._take_copies(), slot, block_table, num_tokens)
        return self._get(ref, "an export of a request's state")

    def write_state(self, slot: int, block_table: list[int], tensors: dict) -> None:
        ref = self.actor.write_state.remote(self._take_copies(), slot, block_table, tensors)
        self._get(ref, "an import of a request's state")

    def expert_load(self):
        return self._get(self.actor.expert_load.remote(), "expert_load")

    def info(self) -> dict:
        return self._get(self.actor.info.remote(), "info")

    def ping(self) -> ray.ObjectRef:
        return self.actor.ping.remote()

    def shutdown(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def _get(self, ref: ray.ObjectRef, what: str):
        """A failure of the call itself is raised as its own error (one request's, for an
        export or import); a rank that is gone is EngineDead."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None
        except ray.exceptions.RayError as e:
            raise self.dead(e, what) from e
