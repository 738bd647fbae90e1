"""The arithmetic of an expert-parallel deployment, from a model's config.json alone: parameters
counted tensor by tensor, weight bytes per GPU, KV and GDN state per sequence, sequences that
fit, and the bytes one decode step moves between ranks. scripts/parallelism_arithmetic.py prints
it; docs/parallelism.md explains it; `qwen35-ray plan` (deploy/plan.py) lays a cluster out with it.

Units: bytes and parameters as plain integers; seconds; bandwidths in GB/s (1e9 B/s).
"""

import math
from dataclasses import dataclass

from qwen35_ray.model.config import ModelConfig

GiB = 2**30
SSM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Hardware:
    nodes: int = 2
    gpus_per_node: int = 8
    ep: int = 16  # expert_parallel_size: ranks in the group, filling nodes in order
    gpu_memory_gib: float = 80.0
    memory_utilization: float = 0.9  # share of GPU memory for weights, caches and the reserve
    reserve_gib: float = 2.0  # activations, all-to-all buffers, CUDA graphs
    # bytes of a resident weight: "bf16" is this engine, which dequantises FP8 checkpoints on
    # load; "fp8" keeps the FP8 releases' weights as stored (e4m3 + block scales), as FP8 GEMMs do
    weights: str = "bf16"
    mtp: bool = False  # the MTP head loaded (weights and its KV)
    kv_dtype_bytes: int = 2  # KV cache and GDN conv state (the recurrent state: mamba_ssm_dtype)
    a2a_dtype_bytes: int = 2  # a hidden vector's element on the wire
    nvlink_gbps: float = 900.0  # per GPU, both directions summed, as NVIDIA quotes it
    ib_gbit: float = 400.0  # Gb/s of each GPU's NIC, each way
    batches: tuple[int, ...] = (64, 256)  # decoding sequences on each rank
    contexts: tuple[int, ...] = (8192, 32768, 131072, 262144)

    def __post_init__(self):
        if self.ep > self.nodes * self.gpus_per_node:
            raise ValueError(
                f"ep={self.ep} needs {self.ep} GPUs but nodes={self.nodes} x gpus_per_node="
                f"{self.gpus_per_node} gives {self.nodes * self.gpus_per_node}; raise nodes or "
                "lower ep"
            )
        if self.weights not in ("bf16", "fp8"):
            raise ValueError(f"weights={self.weights!r} is not one of bf16, fp8")


@dataclass(frozen=True)
class Tensor:
    name: str  # as in Qwen35ForCausalLM(config, with_mtp=True).named_parameters()
    shape: tuple[int, ...]
    # a matmul weight that the FP8 releases store as e4m3 with a fp32 scale per 128x128 block;
    # embeddings, lm_head, norms, conv1d, in_proj_a/b and the gates stay 16-bit there
    fp8: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def routed(self) -> bool:
        return ".mlp.experts." in self.name

    def nbytes(self, weights: str, block: tuple[int, int]) -> int:
        if weights == "bf16" or not self.fp8:
            return 2 * self.numel
        *lead, rows, cols = self.shape
        blocks = math.prod(lead) * math.ceil(rows / block[0]) * math.ceil(cols / block[1])
        return self.numel + 4 * blocks


def mixer_tensors(c: ModelConfig, p: str, kind: str) -> list[Tensor]:
    H = c.hidden_size
    if kind == "linear_attention":
        C, HV, V = c.conv_dim, c.linear_num_value_heads, c.linear_value_head_dim
        return [
            Tensor(p + "linear_attn.in_proj_qkv.weight", (C, H), True),
            Tensor(p + "linear_attn.in_proj_z.weight", (HV * V, H), True),
            Tensor(p + "linear_attn.in_proj_b.weight", (HV, H), False),
            Tensor(p + "linear_attn.in_proj_a.weight", (HV, H), False),
            Tensor(p + "linear_attn.conv1d.weight", (C, 1, c.linear_conv_kernel_dim), False),
            Tensor(p + "linear_attn.A_log", (HV,), False),
            Tensor(p + "linear_attn.dt_bias", (HV,), False),
            Tensor(p + "linear_attn.norm.weight", (V,), False),
            Tensor(p + "linear_attn.out_proj.weight", (H, HV * V), True),
        ]
    Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    return [
        # each head's query followed by its output gate: twice the width
        Tensor(p + "self_attn.q_proj.weight", (2 * Hq * D, H), True),
        Tensor(p + "self_attn.k_proj.weight", (Hkv * D, H), True),
        Tensor(p + "self_attn.v_proj.weight", (Hkv * D, H), True),
        Tensor(p + "self_attn.o_proj.weight", (H, Hq * D), True),
        Tensor(p + "self_attn.q_norm.weight", (D,), False),
        Tensor(p + "self_attn.k_norm.weight", (D,), False),
    ]


def channel_tensors(c: ModelConfig, p: str, moe: bool) -> list[Tensor]:
    H, m = c.hidden_size, p + "mlp."
    if not moe:
        I = c.intermediate_size
        return [
            Tensor(m + "gate_proj.weight", (I, H), True),
            Tensor(m + "up_proj.weight", (I, H), True),
            Tensor(m + "down_proj.weight", (H, I), True),
        ]
    E, I, S = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
    return [
        Tensor(m + "gate.weight", (E, H), False),
        Tensor(m + "experts.gate_up_proj", (E, 2 * I, H), True),
        Tensor(m + "experts.down_proj", (E, H, I), True),
        Tensor(m + "shared_expert.gate_proj.weight", (S, H), True),
        Tensor(m + "shared_expert.up_proj.weight", (S, H), True),
        Tensor(m + "shared_expert.down_proj.weight", (H, S), True),
        Tensor(m + "shared_expert_gate.weight", (1, H), False),
    ]


def layer_tensors(c: ModelConfig, p: str, kind: str, moe: bool) -> list[Tensor]:
    norms = [
        Tensor(p + n + ".weight", (c.hidden_size,), False)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    return norms + mixer_tensors(c, p, kind) + channel_tensors(c, p, moe)


def text_tensors(c: ModelConfig, mtp: bool) -> list[Tensor]:
    """Every parameter of the text model; with `mtp`, the MTP head's too (names `mtp.`)."""
    H, V = c.hidden_size, c.vocab_size
    t = [Tensor("embed_tokens.weight", (V, H), False)]
    for i, (kind, moe) in enumerate(zip(c.layer_types, c.moe_layers)):
        t += layer_tensors(c, f"layers.{i}.", kind, moe)
    t.append(Tensor("norm.weight", (H,), False))
    if not c.tie_word_embeddings:
        t.append(Tensor("lm_head.weight", (V, H), False))
    if mtp:
        t += [
            Tensor(f"mtp.{n}.weight", (H,), False)
            for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")
        ]
        t.append(Tensor("mtp.fc.weight", (H, 2 * H), True))
        for j in range(c.mtp_num_hidden_layers):
            t += layer_tensors(c, f"mtp.layers.{j}.", "full_attention", c.num_experts > 0)
    return t


def vision_params(v: dict) -> int:
    """Parameters of the Qwen3.5 vision tower (transformers' Qwen3_5MoeVisionModel)."""
    h, i, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    m = h * v["spatial_merge_size"] ** 2
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * h + h
    # two LayerNorms; qkv, proj, fc1, fc2, all with biases
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)
    merger = 2 * h + (m * m + m) + (m * out + out)
    return patch + v["num_position_embeddings"] * h + v["depth"] * block + merger


def expert_split(num_experts: int, ep: int) -> list[int]:
    """Experts per rank as qwen35_ray.model.expert_parallel.ExpertShard splits them: the first
    E % N ranks hold one more (16 over 3: 6, 5, 5)."""
    return [num_experts // ep + (r < num_experts % ep) for r in range(ep)]


def p_hit(E: int, held: int, k: int) -> float:
    """Chance that a token's k distinct experts, drawn uniformly from E, include at least one
    of the `held` experts of a rank (or node)."""
    return 1.0 - math.comb(E - held, k) / math.comb(E, k)


def routing(c: ModelConfig, hw: Hardware) -> dict:
    """Where one token's top-k experts live under uniform routing, averaged over the rank the
    token is on: (token, expert) pairs off its GPU and off its node; distinct ranks off its GPU
    and off its node (a token sent once per rank, as DeepEP's low-latency kernels do); distinct
    nodes off its node (sent once per node, then forwarded over NVLink, as its normal kernels
    do). Rank r is on node r // gpus_per_node."""
    E, k, ep = c.num_experts, c.num_experts_per_tok, hw.ep
    split = expert_split(E, ep)
    node = [r // hw.gpus_per_node for r in range(ep)]
    per_node = {n: sum(s for s, m in zip(split, node) if m == n) for n in set(node)}
    hit = [p_hit(E, s, k) for s in split]
    rows = [
        (
            k * (1 - split[r] / E),
            k * (1 - per_node[node[r]] / E),
            sum(h for q, h in enumerate(hit) if q != r),
            sum(h for q, h in enumerate(hit) if node[q] != node[r]),
            sum(p_hit(E, held, k) for n, held in per_node.items() if n != node[r]),
        )
        for r in range(ep)
    ]
    keys = ("pairs_off_gpu", "pairs_off_node", "ranks_off_gpu", "ranks_off_node", "nodes_off_node")
    return {key: sum(col) / ep for key, col in zip(keys, zip(*rows))}


def count_params(c: ModelConfig, raw: dict) -> dict:
    main = text_tensors(c, mtp=False)
    mtp = [t for t in text_tensors(c, mtp=True) if t.name.startswith("mtp.")]

    def count(test=lambda t: True, ts=main):
        return sum(t.numel for t in ts if test(t))

    routed = count(lambda t: t.routed)
    E, k = c.num_experts, c.num_experts_per_tok
    vision = vision_params(raw["vision_config"]) if "vision_config" in raw else 0
    return {
        "embed_and_lm_head": count(lambda t: t.name.split(".")[0] in ("embed_tokens", "lm_head")),
        "gdn_layers": count(lambda t: ".linear_attn." in t.name),
        "attention_layers": count(lambda t: ".self_attn." in t.name),
        "router_shared_expert_dense_mlp": count(lambda t: ".mlp." in t.name and not t.routed),
        "routed_experts": routed,
        "norms": count(lambda t: t.name.endswith("layernorm.weight") or t.name == "norm.weight"),
        "text_total": count(),
        # what one token runs through: all but the routed experts, and top-k of E of those
        "text_active": count() - routed + (routed * k // E if E else 0),
        "mtp_total": count(ts=mtp),
        "vision": vision,
        "total": count() + vision,
    }


def per_gpu(c: ModelConfig, hw: Hardware) -> dict:
    weights, block = hw.weights, c.fp8_block_size or (128, 128)
    served = text_tensors(c, mtp=hw.mtp)
    split = expert_split(c.num_experts, hw.ep) if c.num_experts else [0]
    replicated = sum(t.nbytes(weights, block) for t in served if not t.routed)
    routed = sum(t.nbytes(weights, block) for t in served if t.routed)
    # the rank holding the most experts sets what every rank must fit
    experts = routed * max(split) // c.num_experts if c.num_experts else 0
    budget = int(hw.gpu_memory_gib * GiB * hw.memory_utilization)
    reserve = int(hw.reserve_gib * GiB)
    return {
        "weights": weights,
        "replicated_bytes": replicated,
        "expert_bytes": experts,
        "expert_bytes_total": routed,
        "experts_per_rank": [min(split), max(split)],
        "weights_bytes": replicated + experts,
        "budget_bytes": budget,
        "reserve_bytes": reserve,
        "cache_bytes": max(budget - replicated - experts - reserve, 0),
    }


def cache(c: ModelConfig, raw: dict, hw: Hardware, cache_bytes: int) -> dict:
    ssm = SSM_BYTES[raw.get("text_config", raw).get("mamba_ssm_dtype", "float32")]
    n_attn = len(c.attention_layers) + (c.mtp_num_hidden_layers if hw.mtp else 0)
    kv_token = 2 * n_attn * c.num_key_value_heads * c.head_dim * hw.kv_dtype_bytes
    n_gdn = len(c.gdn_layers)
    conv = n_gdn * c.conv_dim * (c.linear_conv_kernel_dim - 1) * hw.kv_dtype_bytes
    H, K, V = c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    recurrent = n_gdn * H * K * V * ssm
    fit = []
    for ctx in hw.contexts:
        seq = conv + recurrent + ctx * kv_token
        n = cache_bytes // seq
        fit.append(
            {"context": ctx, "bytes_per_seq": seq, "seqs_per_gpu": n, "seqs_per_group": n * hw.ep}
        )
    # at each decode batch: the longest context that many sequences can all have at once
    longest = {}
    for b in hw.batches:
        room = cache_bytes // b - conv - recurrent
        longest[b] = room // kv_token if room >= 0 else None
    return {
        "kv_bytes_per_token": kv_token,
        "gdn_conv_bytes_per_seq": conv,
        "gdn_recurrent_bytes_per_seq": recurrent,
        "gdn_state_bytes_per_seq": conv + recurrent,
        "fit": fit,
        "max_context": longest,
    }


def all_to_all(c: ModelConfig, hw: Hardware) -> dict:
    """Bytes leaving each GPU per decode step, dispatch plus combine, split by link: NVLink for
    ranks on the same node, InfiniBand for the others. Time = bytes / bandwidth of the link,
    the two links working at once; latency and overlap with compute left out."""
    if not c.num_experts:
        return {"per_token": None, "steps": []}
    share = routing(c, hw)
    n_moe, vector = sum(c.moe_layers), c.hidden_size * hw.a2a_dtype_bytes
    # a rank sends and receives at once: each direction gets half the quoted NVLink figure
    nvlink, ib = hw.nvlink_gbps / 2 * 1e9, hw.ib_gbit / 8 * 1e9
    steps = []
    for b in hw.batches:
        for mode, off_gpu, off_node in (
            ("pairs", share["pairs_off_gpu"], share["pairs_off_node"]),
            ("per_rank", share["ranks_off_gpu"], share["ranks_off_node"]),
        ):
            # combine brings back as many hidden vectors as dispatch sent
            nv = 2 * b * (off_gpu - off_node) * vector * n_moe
            net = 2 * b * off_node * vector * n_moe
            steps.append(
                {
                    "batch": b,
                    "mode": mode,
                    "nvlink_bytes_per_layer": nv / n_moe,
                    "ib_bytes_per_layer": net / n_moe,
                    "nvlink_bytes_per_step": nv,
                    "ib_bytes_per_step": net,
                    "nvlink_s_per_step": nv / nvlink,
                    "ib_s_per_step": net / ib,
                }
            )
    return {"per_token": share, "steps": steps}


def plan(raw: dict, hw: Hardware) -> dict:
    """Everything above for one config.json (as a dict) on one hardware description."""
    c = ModelConfig.from_dict(raw)
    if c.num_experts and hw.ep > c.num_experts:
        raise ValueError(
            f"ep={hw.ep} exceeds the model's {c.num_experts} routed experts per layer; every "
            "rank must hold at least one: lower ep"
        )
    gpu = per_gpu(c, hw)
    return {
        "model": {
            "layers": c.num_hidden_layers,
            "gdn_layers": len(c.gdn_layers),
            "attention_layers": len(c.attention_layers),
            "moe_layers": sum(c.moe_layers),
            "num_experts": c.num_experts,
            "experts_per_token": c.num_experts_per_tok,
            "hidden_size": c.hidden_size,
        },
        "params": count_params(c, raw),
        "per_gpu": gpu,
        "cache": cache(c, raw, hw, gpu["cache_bytes"]),
        "all_to_all": all_to_all(c, hw),
    }


def ep_sizes(nodes: int, gpus_per_node: int, num_experts: int) -> list[int]:
    """The expert-parallel sizes a cluster divides into evenly, smallest first: within a node the
    powers of two that divide gpus_per_node, and gpus_per_node itself; across nodes, groups of
    whole nodes (k x gpus_per_node for k dividing nodes), so that no group straddles a node
    boundary part-way. None above the routed experts per layer (each rank holds one at least); a
    dense model has no experts to split: EP 1 only."""
    G = gpus_per_node
    within = [g for g in range(1, G + 1) if G % g == 0 and (g & (g - 1) == 0 or g == G)]
    across = [k * G for k in range(2, nodes + 1) if nodes % k == 0]
    return [ep for ep in within + across if ep == 1 or ep <= num_experts]
