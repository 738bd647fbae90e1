"""Serve request routers of the disaggregated app. They run in the caller (the ingress) and
rank the replicas of one pool for each request.

- PrefixAffinityRouter (prefill pool): a prompt goes where its longest block-aligned prefix
  went before, so that replica's prefix cache holds it, unless that replica is more than
  `max_imbalance` ongoing requests above the least loaded one; otherwise the least loaded.
- FreeSlotsRouter (decode pool): the replica with the most free GDN state slots, then the most
  free KV blocks. Replicas report both through `record_routing_stats` every second; requests
  sent since then are counted as taking a slot each.
"""

from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from qwen35_ray.engine.block_manager import block_hashes


def prefix_keys(prompt_ids: list[int], block_size: int, max_blocks: int = 64) -> list[bytes]:
    """Hashes of the prompt's block-aligned prefixes, longest first (the prefix cache's own
    chained block hashes, so affinity matches what the replica can reuse)."""
    n = min(len(prompt_ids) // block_size, max_blocks)
    return block_hashes(prompt_ids, block_size, n)[::-1]


class _PoolRouter(RequestRouter):
    def _ongoing(self, r: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(r.replica_id) or 0

    def _least_loaded(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        return sorted(candidates, key=self._ongoing)


class PrefixAffinityRouter(_PoolRouter):
    def initialize_state(self, block_size: int = 16, max_imbalance: int = 4, capacity=100_000):
        self.block_size, self.max_imbalance, self.capacity = block_size, max_imbalance, capacity
        self.owner: OrderedDict[bytes, ReplicaID] = OrderedDict()  # prefix hash -> replica, LRU

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest = None
    ) -> list[list[RunningReplica]]:
        ranked = self._least_loaded(candidate_replicas)
        if not ranked or pending_request is None or not pending_request.args:
            return [ranked]
        by_id = {r.replica_id: r for r in ranked}
        floor = self._ongoing(ranked[0])
        for key in prefix_keys(pending_request.args[0], self.block_size):
            owner = by_id.get(self.owner.get(key))
            if owner is not None:
                if self._ongoing(owner) <= floor + self.max_imbalance:
                    return [[owner], ranked]
                break
        return [ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        if not pending_request.args:
            return
        for key in prefix_keys(pending_request.args[0], self.block_size):
            self.owner[key] = replica_id
            self.owner.move_to_end(key)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)


class FreeSlotsRouter(_PoolRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest = None
    ) -> list[list[RunningReplica]]:
        def room(r: RunningReplica) -> tuple[int, int]:
            stats = r.routing_stats or {}
            # ongoing requests each hold (or will hold) a slot; stats may be a second old
            slots = stats.get("state_slots_total", 1) - self._ongoing(r)
            return (-slots, -stats.get("kv_blocks_free", 0))

        return [sorted(candidate_replicas, key=room)]
