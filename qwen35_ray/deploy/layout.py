"""The layout rule of `qwen35-ray plan`: from a model config and a cluster, the expert-parallel
size, the replicas and their pools, the engine's cache budgets, the Serve app's args and the
worker groups of its Ray cluster.

Per GPU (each rank of an EP group holds the replicated weights and 1/EP of the routed experts,
and runs sequences of its own; attention and GDN are data-parallel):
1. budget = GPU memory x memory_utilization; cache room = budget - weights - reserve (the
   reserve: activations, all-to-all buffers).
2. one sequence at the context costs 2 GDN state slots (its own and a prefix-cache snapshot
   slot: the engine keeps as many snapshots as running slots) and ceil(context / 16) KV blocks.
3. EP: the smallest of sizing.ep_sizes whose cache room holds min_seqs sequences per GPU. A
   larger EP frees memory for caches on the same GPUs, but its all-to-all crosses more links
   (InfiniBand once it spans nodes) and one failed rank takes the whole group down. If no EP
   reaches min_seqs, the EP holding the most; if none holds even one, the cluster is too small.
4. replicas = GPUs / EP. One: the collocated app (build_app). Two or more: the disaggregated app
   (build_pd_app), about prefill_share of the GPUs prefilling (1 : 3 by default, at least one
   replica each): a prompt passes through a prefill replica once, compute-bound, while a
   sequence holds a decode slot for every token of its answer. On two or more nodes the split
   is made at whole nodes, so that each node serves one pool and the pins mean something: its
   pods advertise prefill_node or decode_node, and a pool asks for 0.01 of its own. On one node
   the two pools share it, split by replica, unpinned (a node advertising both would let Ray
   place either pool on any of its GPUs: no pin at all, written as one).
5. placement: an EP group within a node STRICT_PACK, over nodes PACK (rank_num_gpus 1 per
   rank); EP 1: num_gpus 1 on the replica itself.
"""

import math
from dataclasses import dataclass

import torch

from qwen35_ray.deploy.k8s_samples import POOL_NODE
from qwen35_ray.deploy.rayservice import WorkerGroup
from qwen35_ray.deploy.sizing import GiB, Hardware, ep_sizes, per_gpu
from qwen35_ray.engine.request_state import state_nbytes
from qwen35_ray.model.config import ModelConfig

BLOCK_SIZE = 16  # EngineArgs.block_size: the engine's default, which the plan keeps
MAX_SEQS = 256  # max_num_seqs per rank at most: beyond it, the room goes to longer KV
REPLICA_CPUS = 2  # the replica actor of an EP group (its ranks hold the GPUs)
INGRESS = {"num_replicas": 2, "num_cpus": 1}
POOL_ASK = 0.01  # what a pinned pool asks of the POOL_NODE its nodes advertise
DTYPE = torch.bfloat16  # the engine's compute and cache dtype here (FP8 is dequantised on load)


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    memory_utilization: float = 0.9
    reserve_gib: float = 2.0
    weights: str = "bf16"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def hardware(self, ep: int) -> Hardware:
        return Hardware(
            nodes=self.nodes,
            gpus_per_node=self.gpus_per_node,
            ep=ep,
            gpu_memory_gib=self.gpu_memory_bytes / GiB,
            memory_utilization=self.memory_utilization,
            reserve_gib=self.reserve_gib,
            weights=self.weights,
        )


@dataclass(frozen=True)
class SeqCost:
    """What one sequence takes of a rank's caches, as the engine allocates them."""

    kv_bytes_per_token: int
    gdn_conv_bytes: int  # per sequence, all GDN layers
    gdn_recurrent_bytes: int
    slots_per_seq: int  # 2 with prefix caching (a running slot and a snapshot slot)
    block_size: int = BLOCK_SIZE

    @property
    def gdn_state_bytes(self) -> int:
        return self.gdn_conv_bytes + self.gdn_recurrent_bytes

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.kv_bytes_per_token

    def seq_bytes(self, context: int) -> int:
        blocks = -(-context // self.block_size)
        return self.slots_per_seq * self.gdn_state_bytes + blocks * self.block_bytes

    def seqs(self, room: int, context: int) -> int:
        return max(room, 0) // self.seq_bytes(context)


def seq_cost(c: ModelConfig, prefix_caching: bool = True) -> SeqCost:
    """From request_state.state_nbytes, which sizes the tensors a prefill->decode transfer
    carries and which are the engine's cache (HybridCache) per slot and per token: GDN conv
    state in the cache dtype, recurrent state in fp32."""
    conv = len(c.gdn_layers) * c.conv_dim * (c.linear_conv_kernel_dim - 1) * DTYPE.itemsize
    state = state_nbytes(c, DTYPE, 0)
    kv = state_nbytes(c, DTYPE, 1) - state
    return SeqCost(kv, conv, state - conv, 2 if prefix_caching else 1)


@dataclass(frozen=True)
class EPRow:
    ep: int
    replicated_bytes: int
    experts_per_rank: int  # the most any rank holds (the first E % EP ranks hold one more)
    expert_bytes: int
    weights_bytes: int
    budget_bytes: int
    reserve_bytes: int
    room_bytes: int  # budget - weights - reserve; negative when the weights alone do not fit
    seqs_per_gpu: int  # at the context


def ep_rows(c: ModelConfig, cluster: Cluster, cost: SeqCost, context: int) -> list[EPRow]:
    rows = []
    for ep in ep_sizes(cluster.nodes, cluster.gpus_per_node, c.num_experts):
        g = per_gpu(c, cluster.hardware(ep))
        room = g["budget_bytes"] - g["weights_bytes"] - g["reserve_bytes"]
        rows.append(
            EPRow(
                ep=ep,
                replicated_bytes=g["replicated_bytes"],
                experts_per_rank=g["experts_per_rank"][1],
                expert_bytes=g["expert_bytes"],
                weights_bytes=g["weights_bytes"],
                budget_bytes=g["budget_bytes"],
                reserve_bytes=g["reserve_bytes"],
                room_bytes=room,
                seqs_per_gpu=cost.seqs(room, context),
            )
        )
    return rows


class TooSmall(ValueError):
    """No EP size leaves room for one sequence at the context."""


def choose_ep(rows: list[EPRow], min_seqs: int, cost: SeqCost, context: int) -> tuple[EPRow, str]:
    """The row the rule picks and why, in words."""
    enough = [r for r in rows if r.seqs_per_gpu >= min_seqs]
    if enough:
        r = enough[0]
        smaller = f"; EP {rows[rows.index(r) - 1].ep} holds fewer" if r is not rows[0] else ""
        return r, f"the smallest EP holding >= {min_seqs} sequences per GPU{smaller}"
    best = max(rows, key=lambda r: (r.seqs_per_gpu, r.ep))
    if best.seqs_per_gpu >= 1:
        return best, (
            f"no EP holds {min_seqs} sequences per GPU (--min-seqs); EP {best.ep} holds the "
            f"most, {best.seqs_per_gpu}"
        )
    r = rows[-1]
    need = r.weights_bytes + r.reserve_bytes + cost.seq_bytes(context)
    missing = need - r.budget_bytes
    raise TooSmall(
        f"does not fit: at EP {r.ep}, the largest this cluster allows, a GPU needs "
        f"{r.weights_bytes / GiB:.2f} GiB of weights + {r.reserve_bytes / GiB:.2f} reserve + "
        f"{cost.seq_bytes(context) / GiB:.2f} for one sequence of {context} tokens = "
        f"{need / GiB:.2f} GiB, over its budget of {r.budget_bytes / GiB:.2f} GiB: "
        f"{missing / GiB:.2f} GiB missing per GPU ({missing * r.ep / GiB:.2f} GiB over the "
        f"group of {r.ep}). Add GPUs (a larger EP splits the experts thinner), shorten "
        "--context, or raise --gpu-memory / --memory-utilization"
    )


@dataclass(frozen=True)
class Layout:
    ep: int
    replicas: int
    prefill: int  # replicas of the prefill pool; 0: collocated
    decode: int
    prefill_nodes: int  # 0: pools unpinned (one worker group of every node)
    decode_nodes: int
    placement: str | None  # None: EP 1, no placement group

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0


def _share(n: int, share: float) -> int:
    """round(n x share) half up, at least 1, leaving at least 1."""
    return min(n - 1, max(1, math.floor(n * share + 0.5)))


def layout(cluster: Cluster, ep: int, prefill_share: float) -> Layout:
    G = cluster.gpus_per_node
    replicas = cluster.gpus // ep
    placement = None if ep == 1 else "STRICT_PACK" if ep <= G else "PACK"
    if replicas == 1:
        return Layout(ep, 1, 0, 0, 0, 0, placement)
    if cluster.nodes == 1:
        prefill = _share(replicas, prefill_share)
        return Layout(ep, replicas, prefill, replicas - prefill, 0, 0, placement)
    # a unit: the fewest whole nodes holding whole replicas
    unit_nodes = max(1, ep // G)
    units = cluster.nodes // unit_nodes
    per_unit = max(1, G // ep)
    p = _share(units, prefill_share)
    return Layout(
        ep,
        replicas,
        p * per_unit,
        (units - p) * per_unit,
        p * unit_nodes,
        (units - p) * unit_nodes,
        placement,
    )


def engine_args(row: EPRow, cost: SeqCost, context: int, max_seqs: int = MAX_SEQS) -> dict:
    """The `engine` keys that make the engine allocate what the plan counts: max_num_seqs
    running slots and as many snapshot slots (state_memory_bytes), the rest of the room as
    whole KV blocks (kv_cache_memory_bytes)."""
    n = min(row.seqs_per_gpu, max_seqs)
    state = cost.slots_per_seq * n * cost.gdn_state_bytes
    blocks = (row.room_bytes - state) // cost.block_bytes
    out = {
        "max_model_len": context,
        "max_num_seqs": n,
        "kv_cache_memory_bytes": blocks * cost.block_bytes,
        "state_memory_bytes": state,
    }
    if cost.slots_per_seq == 1:
        out["enable_prefix_caching"] = False
    return out


def _pool(lay: Layout, replicas: int, cpus_per_gpu: int, pin: str | None) -> dict:
    out: dict = {"num_replicas": replicas}
    if lay.ep == 1:
        out |= {"num_gpus": 1, "num_cpus": cpus_per_gpu}
    else:
        # the replica actor holds no GPU: its ranks do, one each
        out |= {"num_gpus": 0, "num_cpus": REPLICA_CPUS}
    if pin is not None:
        out["resources"] = {pin: POOL_ASK}
    return out


def app_args(model: str, lay: Layout, engine: dict, cpus_per_gpu: int) -> dict:
    """`args` for qwen35_ray.serving.config.AppConfig."""
    engine = dict(engine)
    if lay.ep > 1:
        engine |= {
            "expert_parallel_size": lay.ep,
            "rank_num_gpus": 1,
            "rank_num_cpus": cpus_per_gpu,
            "placement_strategy": lay.placement,
        }
    args = {"model": model, "dtype": "bfloat16", "device": "cuda", "engine": engine}
    if not lay.disaggregated:
        args["llm_server"] = _pool(lay, lay.replicas, cpus_per_gpu, None)
    else:
        pinned = lay.prefill_nodes > 0
        args["prefill_server"] = _pool(
            lay, lay.prefill, cpus_per_gpu, "prefill_node" if pinned else None
        )
        args["decode_server"] = _pool(
            lay, lay.decode, cpus_per_gpu, "decode_node" if pinned else None
        )
    args["ingress"] = dict(INGRESS)
    return args


def serve_config(args: dict, disaggregated: bool) -> dict:
    """A whole Serve config (what `serve deploy` and a RayService's serveConfigV2 take)."""
    builder = "build_pd_app" if disaggregated else "build_app"
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "qwen35",
                "route_prefix": "/",
                "import_path": f"qwen35_ray.serving.builder:{builder}",
                "args": args,
            }
        ],
    }


def pod_cpus(cluster: Cluster, ep: int, cpus_per_gpu: int) -> int:
    """A GPU pod's CPUs: its ranks (or EP-1 replicas), the replica actors of the EP groups
    starting on it, and room for both ingress replicas."""
    G = cluster.gpus_per_node
    actors = 0 if ep == 1 else max(1, G // ep) * REPLICA_CPUS
    return G * cpus_per_gpu + actors + INGRESS["num_replicas"] * INGRESS["num_cpus"]


def worker_groups(
    cluster: Cluster, lay: Layout, cpus_per_gpu: int, memory_per_gpu_gib: int, product: str | None
) -> tuple[WorkerGroup, ...]:
    """GPU pods, one per node: one group, or a prefill and a decode group when pinned."""
    G = cluster.gpus_per_node

    def group(name: str, pods: int, pin: str | None) -> WorkerGroup:
        return WorkerGroup(
            name,
            pods,
            pods,
            pods,
            cpus=pod_cpus(cluster, lay.ep, cpus_per_gpu),
            memory=f"{G * memory_per_gpu_gib}Gi",
            gpus=G,
            ray_resources={pin: POOL_NODE} if pin else {},
            gpu_product=product,
        )

    if lay.prefill_nodes == 0:
        return (group("gpu", cluster.nodes, None),)
    return (
        group("prefill-gpu", lay.prefill_nodes, "prefill_node"),
        group("decode-gpu", lay.decode_nodes, "decode_node"),
    )
