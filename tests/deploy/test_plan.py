"""`qwen35-ray plan` (qwen35_ray/deploy/plan.py): the memory table for Qwen3.5-397B-A17B on
2 x 8 H100 80 GB, every figure reproduced here by hand from the config's dimensions; the Serve
YAML and RayService it writes for the real configs validate (Ray's ServeDeploySchema, our
AppConfig, the KubeRay CRD) and their replicas fit the pods they describe; the engine, given
the written settings, allocates what the plan counted; the errors a user can hit are readable."""

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from crd_schema import crd_errors, crd_schema
from ray.serve.schema import ServeDeploySchema

from qwen35_ray.deploy.plan import main, memory_bytes
from qwen35_ray.deploy.sizing import ep_sizes
from qwen35_ray.engine.cache_sizing import size_cache
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.tiny.checkpoint import tiny_config
from qwen35_ray.model.tiny.tokenizer import SPECIAL_TOKENS
from qwen35_ray.serving import builder
from qwen35_ray.serving.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
CONFIGS = SHARED / "qwen35" / "configs"
CRD = SHARED / "kuberay" / "ray.io_rayservices.yaml"
GiB = 2**30
pytestmark = pytest.mark.skipif(
    not CONFIGS.is_dir(), reason=f"reference configs {CONFIGS} absent: check out shared/ beside"
)


rayservice_schema = functools.cache(lambda: crd_schema(CRD))


def config(name: str) -> Path:
    return CONFIGS / f"{name}.config.json"


def cli(model, nodes: int, out: Path, *extra) -> list:
    """The command line for `nodes` x 8 GPUs of 80 GiB."""
    hw = ["--nodes", nodes, "--gpus-per-node", 8, "--gpu-memory", "80GiB"]
    return ["--model", model, *hw, "--out", out, *extra]


def plan(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def plan_json(capsys, *argv: str) -> dict:
    rc, out, err = plan(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def section(text: str, heading: str) -> str:
    """The printed text under `## heading...` up to the next heading."""
    return text.split("\n## " + heading, 1)[1].split("\n## ", 1)[0]


def cells(text: str, first: str) -> list[str]:
    """The cells of the printed table row whose first cell is `first`."""
    (row,) = [line for line in text.splitlines() if re.match(rf"\| {first} +\|", line)]
    return [c.strip() for c in row.strip("|").split("|")]


def by_hand(t: dict, ep: int) -> dict:
    """Parameters tensor family by tensor family from a text config, bf16 bytes per GPU at EP."""
    H, V, L = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    n_gdn = t["layer_types"].count("linear_attention")
    n_attn = t["layer_types"].count("full_attention")
    assert n_gdn + n_attn == L and not t.get("mlp_only_layers")  # every layer is MoE
    E, k, I, S = (
        t[n]
        for n in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        )
    )
    Hq, Hkv, D = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    Kh, Kd = t["linear_num_key_heads"], t["linear_key_head_dim"]
    Vh, Vd, W = t["linear_num_value_heads"], t["linear_value_head_dim"], t["linear_conv_kernel_dim"]
    C = 2 * Kh * Kd + Vh * Vd  # GDN conv channels: q, k, v
    # in_proj_qkv, in_proj_z, in_proj_a and _b, conv1d, A_log and dt_bias, norm, out_proj
    gdn = C * H + Vh * Vd * H + 2 * Vh * H + C * W + 2 * Vh + Vd + H * Vh * Vd
    # q_proj (with its output gate: twice the width), k_proj, v_proj, o_proj, q_norm, k_norm
    attn = 2 * Hq * D * H + 2 * Hkv * D * H + H * Hq * D + 2 * D
    # router, shared expert (gate, up, down) and its gate, two layer norms
    per_layer = E * H + 3 * S * H + H + 2 * H
    embed = (1 if t["tie_word_embeddings"] else 2) * V * H
    replicated = embed + H + n_gdn * gdn + n_attn * attn + L * per_layer
    expert = 3 * I * H  # gate, up, down of one expert in one layer
    assert E % ep == 0
    kv = n_attn * 2 * Hkv * D * 2
    conv, recurrent = n_gdn * C * (W - 1) * 2, n_gdn * Vh * Kd * Vd * 4
    return {
        "params_total": replicated + L * E * expert,
        "params_active": replicated + L * k * expert,
        "experts_per_rank": E // ep,
        "replicated_bytes": 2 * replicated,
        "expert_bytes": 2 * L * (E // ep) * expert,
        "kv": kv,
        "conv": conv,
        "recurrent": recurrent,
        # a running slot and a prefix-cache snapshot slot, and the KV of the whole context
        "seq": lambda ctx: 2 * (conv + recurrent) + ctx * kv,
    }


def test_397b_on_two_nodes_of_eight_h100_by_hand(capsys, tmp_path):
    raw = json.loads(config("Qwen3.5-397B-A17B").read_text())
    t = raw["text_config"]
    argv = cli(config("Qwen3.5-397B-A17B"), 2, tmp_path / "p")
    rc, printed, _ = plan(capsys, *argv)
    assert rc == 0
    out = section(printed, "Weights per GPU by EP size")
    budget, reserve = int(80 * GiB * 0.9), 2 * GiB
    assert budget == 72 * GiB

    def gib(b: int) -> str:
        return f"{b / GiB:.2f}"

    # the printed table: every EP that divides 2 x 8 GPUs evenly, one row each
    ctx, seqs = 32768, {}
    for ep in (1, 2, 4, 8, 16):
        h = by_hand(t, ep)
        weights = h["replicated_bytes"] + h["expert_bytes"]
        room = budget - weights - reserve
        seqs[ep] = max(room, 0) // h["seq"](ctx)
        row = cells(out, str(ep))
        assert row[:7] == [
            str(ep),
            gib(h["replicated_bytes"]),
            str(h["experts_per_rank"]),
            gib(h["expert_bytes"]),
            gib(weights),
            gib(room),
            str(seqs[ep]),
        ]
        assert row[7].startswith("yes" if seqs[ep] else "no")
    # the figures docs/parallelism.md quotes for this deployment
    assert cells(out, "16")[1:6] == ["18.25", "32", "45.00", "63.25", "6.75"]
    assert seqs == {1: 0, 2: 0, 4: 0, 8: 0, 16: 5} and cells(out, "16")[7] == "yes <- chosen"
    assert "(bf16; budget 80.00 GiB x 0.9 = 72.00 GiB" in out

    out = section(printed, "Caches")

    h = by_hand(t, 16)
    assert h["kv"] == 15 * 2 * 2 * 256 * 2 == 30_720
    assert h["conv"] == 45 * 12288 * 3 * 2 and h["recurrent"] == 45 * 64 * 128 * 128 * 4
    assert (
        "KV per token: 15 attention layers x 2 (K, V) x 2 KV heads x 256 head dim x 2 B = "
        "30,720 B (30.0 KiB)" in out
    )
    assert f"= {h['conv']:,} + {h['recurrent']:,} = {h['conv'] + h['recurrent']:,} B" in out
    head = printed.split("\n## ")[0]
    assert f"{h['params_total'] / 1e9:.2f} B in the text model" in head
    assert f"{h['params_active'] / 1e9:.2f} B active per token" in head
    assert "60 layers (45 GDN, 15 attention), 60 MoE layers of 512 routed experts, top-10" in head
    # sequences at several contexts, per GPU, per replica (16 GPUs) and over the cluster
    out = section(printed, "Sequences at EP 16 (6.75 GiB of cache room per GPU)")
    room = budget - h["replicated_bytes"] - h["expert_bytes"] - reserve
    for n in (8192, 32768, 131072, 262144):
        per_gpu = room // h["seq"](n)
        assert cells(out, str(n))[2:] == [str(per_gpu), str(16 * per_gpu), str(16 * per_gpu)]
    assert cells(out, "32768")[1] == f"{h['seq'](32768) / 2**20:.1f}" == "1326.3"
    # the prefill -> decode transfer: GDN state + prompt x KV per token
    out = section(printed, "Prefill -> decode transfer")
    for n in (1024, 4096, 32768, 131072):
        bytes_ = h["conv"] + h["recurrent"] + n * h["kv"]
        assert cells(out, str(n))[1:3] == [f"{bytes_:,}", f"{bytes_ / 2**20:.1f}"]
    assert cells(out, "32768")[1] == "1,198,694,400"

    # the same figures as exact integers
    f = plan_json(capsys, *argv)
    (row16,) = [r for r in f["ep_table"] if r["ep"] == 16]
    assert row16["room_bytes"] == room and row16["seqs_per_gpu"] == 5
    assert f["kv_bytes_per_token"] == h["kv"]
    assert f["gdn_state_bytes_per_seq"] == h["conv"] + h["recurrent"]
    assert [x["bytes"] for x in f["transfer"]] == [
        h["conv"] + h["recurrent"] + n * h["kv"] for n in (1024, 4096, 32768, 131072)
    ]
    # the layout: one EP-16 group over both nodes, collocated
    assert f["layout"]["ep"] == 16 and f["layout"]["replicas"] == 1
    assert not f["layout"]["disaggregated"] and f["layout"]["placement"] == "PACK"
    state = 2 * 5 * (h["conv"] + h["recurrent"])
    block = 16 * h["kv"]
    assert f["engine"] == {
        "max_model_len": 32768,
        "max_num_seqs": 5,
        "state_memory_bytes": state,
        "kv_cache_memory_bytes": (room - state) // block * block,
    }
    out = section(printed, "Layout")
    assert "1 replica of 16 GPUs, each group over nodes (PACK): the collocated app" in out
    assert "EP 16: no EP holds 16 sequences per GPU (--min-seqs); EP 16 holds the most, 5" in out


@pytest.mark.parametrize(
    "name,nodes",
    [
        ("Qwen3.5-397B-A17B", 2),
        ("Qwen3.5-35B-A3B", 1),
        ("Qwen3.5-35B-A3B", 4),
        ("Qwen3.5-122B-A10B", 1),
        ("Qwen3.5-122B-A10B", 4),
    ],
)
def test_the_engine_allocates_what_the_plan_counts(capsys, tmp_path, name, nodes):
    f = plan_json(capsys, *cli(config(name), nodes, tmp_path))
    e, n = f["engine"], f["engine"]["max_num_seqs"]
    c = ModelConfig.from_hf(config(name))
    size = size_cache(c, EngineConfig(**e), torch.bfloat16, e["max_model_len"])
    assert (size.num_slots, size.num_snapshots) == (n, n)
    # every running sequence can hold the whole context at once
    assert size.num_blocks >= n * math.ceil(e["max_model_len"] / 16)
    (row,) = [r for r in f["ep_table"] if r["ep"] == f["layout"]["ep"]]
    assert e["kv_cache_memory_bytes"] + e["state_memory_bytes"] <= row["room_bytes"]
    # one more sequence would not have fitted the room (unless max_num_seqs hit its cap)
    seq = 2 * f["gdn_state_bytes_per_seq"] + 32768 * f["kv_bytes_per_token"]
    assert row["room_bytes"] < (n + 1) * seq or n == 256


def node_capacity(group: dict) -> dict[str, float]:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    out = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    return out | {k: float(v) for k, v in group.get("resources", {}).items()}


def place(nodes: list[dict], bundles: list[dict], strict: bool) -> bool:
    """First fit of one replica's bundles (STRICT_PACK: all on one node); takes what it uses."""
    fits = lambda d, node: all(node.get(k, 0) >= v - 1e-9 for k, v in d.items())  # noqa: E731
    if strict:
        need = {k: sum(b.get(k, 0) for b in bundles) for b in bundles for k in b}
        bundles = [need]
    for b in bundles:
        node = next((n for n in nodes if fits(b, n)), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def replicas_fit(doc: dict, app: dict) -> None:
    """Every replica of every pool, and the ingress, placed at once on the manifest's pods, a
    pinned pool only on pods advertising its resource."""
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    nodes = [node_capacity(g) for g in groups for _ in range(g["replicas"])]
    cfg = AppConfig.model_validate(app["args"])
    pools = ["prefill_server", "decode_server"] if "pd" in app["import_path"] else ["llm_server"]
    for pool in [*pools, "ingress"]:
        o = cfg.serve_options(pool)
        a = o["ray_actor_options"]
        one = [{"CPU": a["num_cpus"], "GPU": a["num_gpus"], **a.get("resources", {})}]
        bundles = o.get("placement_group_bundles", one)
        strict = o.get("placement_group_strategy") == "STRICT_PACK"
        for i in range(o["num_replicas"]):
            assert place(nodes, bundles, strict), f"{pool} replica {i} finds no room: {nodes}"
    # the plan leaves no GPU idle
    assert all(n["GPU"] == 0 for n in nodes)


@pytest.mark.parametrize(
    "name,nodes",
    [
        ("Qwen3.5-35B-A3B", 1),
        ("Qwen3.5-35B-A3B", 2),
        ("Qwen3.5-35B-A3B", 4),
        ("Qwen3.5-122B-A10B", 1),
        ("Qwen3.5-122B-A10B", 4),
        ("Qwen3.5-397B-A17B", 2),
    ],
)
def test_written_serve_yaml_and_rayservice_validate_and_fit(capsys, tmp_path, name, nodes):
    rc, out, err = plan(capsys, *cli(config(name), nodes, tmp_path))
    assert rc == 0, err
    assert f"wrote {tmp_path / 'serve.yaml'}" in out and f"wrote {tmp_path / 'rayservice.yaml'}"
    serve_text = (tmp_path / "serve.yaml").read_text()
    serve = yaml.safe_load(serve_text)
    ServeDeploySchema.model_validate(serve)
    (app,) = serve["applications"]
    assert AppConfig.model_validate(app["args"]).model == f"Qwen/{name}"
    # the builder Serve will call accepts the args (Ray is not started: nothing runs)
    build = getattr(builder, app["import_path"].split(":")[1])
    assert build(app["args"]).__class__.__name__ == "Application"
    doc = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())
    assert doc["spec"]["serveConfigV2"] == serve_text
    if CRD.exists():
        assert crd_errors(rayservice_schema(), doc) == []
    replicas_fit(doc, app)
    args, groups = app["args"], doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    if "prefill_server" in args and nodes > 1:
        # disaggregated over nodes: each pool pinned to a worker group of its own
        assert args["prefill_server"]["resources"] == {"prefill_node": 0.01}
        assert args["decode_server"]["resources"] == {"decode_node": 0.01}
        assert [g.get("resources") for g in groups] == [
            {"prefill_node": "100"},
            {"decode_node": "100"},
        ]
    else:
        # collocated, or both pools on one node: one group, no pins
        assert len(groups) == 1 and "resources" not in groups[0]
        assert all("resources" not in args.get(p, {}) for p in ("prefill_server", "decode_server"))
    assert sum(g["replicas"] for g in groups) == nodes


def test_layout_rule_on_35b(capsys, tmp_path):
    model = config("Qwen3.5-35B-A3B")
    one = plan_json(capsys, *cli(model, 1, tmp_path))
    seqs = {r["ep"]: r["seqs_per_gpu"] for r in one["ep_table"]}
    # EP 1 holds fewer than 16 sequences of 32k per GPU, EP 2 more: EP 2, 4 replicas on one
    # node, 1 prefill : 3 decode, unpinned
    assert seqs[1] < 16 <= seqs[2]
    lay = one["layout"]
    assert (lay["ep"], lay["replicas"], lay["prefill"], lay["decode"]) == (2, 4, 1, 3)
    assert lay["prefill_nodes"] == 0 and lay["placement"] == "STRICT_PACK"
    # four nodes: the split at whole nodes, 1 prefill node : 3 decode nodes
    lay = plan_json(capsys, *cli(model, 4, tmp_path))["layout"]
    split = (lay["prefill"], lay["decode"], lay["prefill_nodes"], lay["decode_nodes"])
    assert split == (4, 12, 1, 3)
    # asking for fewer sequences per GPU: EP 1, a replica per GPU
    lay = plan_json(capsys, *cli(model, 1, tmp_path, "--min-seqs", 4))["layout"]
    assert (lay["ep"], lay["replicas"], lay["prefill"], lay["decode"]) == (1, 8, 2, 6)
    args = yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]["args"]
    assert args["decode_server"]["num_gpus"] == 1 and "expert_parallel_size" not in args["engine"]


def test_too_small_a_cluster_exits_2_saying_what_is_missing(capsys, tmp_path):
    rc, out, err = plan(capsys, *cli(config("Qwen3.5-397B-A17B"), 1, tmp_path / "p"))
    assert rc == 2
    h = by_hand(json.loads(config("Qwen3.5-397B-A17B").read_text())["text_config"], 8)
    need = h["replicated_bytes"] + h["expert_bytes"] + 2 * GiB + h["seq"](32768)
    missing = need - int(80 * GiB * 0.9)
    assert f"{missing / GiB:.2f} GiB missing per GPU" in err and "39.55 GiB missing" in err
    assert "Add GPUs" in err and "## Weights per GPU by EP size" in out
    assert not (tmp_path / "p").exists()


def test_gpu_memory_units():
    assert memory_bytes("80GiB") == 80 * GiB and memory_bytes("141GiB") == 141 * GiB
    assert memory_bytes("80GB") == 80 * 10**9 and memory_bytes("80") == 80 * GiB
    assert memory_bytes("80 gib") == 80 * GiB


@pytest.mark.parametrize("bad", ["80GX", "eighty", "0", "-80GiB", "80 G B"])
def test_bad_gpu_memory_is_a_readable_error(capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["--model", "x", "--nodes", "1", "--gpus-per-node", "8", f"--gpu-memory={bad}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --gpu-memory: {bad!r} is not a memory size; write e.g. 80GiB" in err


def test_a_directory_a_config_json_and_a_flat_text_config_agree(capsys, tmp_path):
    raw = json.loads(config("Qwen3.5-122B-A10B").read_text())
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    # a text-only config: text_config's keys at the top level (model_type qwen3_5_moe_text)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "config.json").write_text(json.dumps(raw["text_config"]))
    figures = [
        plan_json(capsys, *cli(model, 2, tmp_path / "o"))
        for model in (
            tmp_path / "ckpt",
            tmp_path / "ckpt" / "config.json",
            tmp_path / "flat",
            config("Qwen3.5-122B-A10B"),
        )
    ]
    for f in figures:
        del f["files"], f["model"]["params_vision"]
    assert figures[0] == figures[1] == figures[2] == figures[3]
    args = yaml.safe_load((tmp_path / "o" / "serve.yaml").read_text())["applications"][0]["args"]
    assert args["model"] == "Qwen/Qwen3.5-122B-A10B"
    plan_json(capsys, *cli(tmp_path / "ckpt", 2, tmp_path / "o"))
    args = yaml.safe_load((tmp_path / "o" / "serve.yaml").read_text())["applications"][0]["args"]
    # a local checkpoint is served from its directory, as given
    assert args["model"] == str(tmp_path / "ckpt")


def test_a_hub_id_fetches_its_config_json_only(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename, kw))
        return str(config("Qwen3.5-35B-A3B"))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    f = plan_json(capsys, *cli("Qwen/Qwen3.5-35B-A3B", 1, tmp_path))
    assert asked == [("Qwen/Qwen3.5-35B-A3B", "config.json", {})]
    assert f["layout"]["ep"] == 2
    args = yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]["args"]
    assert args["model"] == "Qwen/Qwen3.5-35B-A3B"


def test_missing_model_and_fp8_say_why(capsys, tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory, nor a hub id"):
        main([str(a) for a in cli("no-such-thing", 1, tmp_path)])
    # fp8 resident weights are for comparison: this engine dequantises them, so no files
    argv = cli(config("Qwen3.5-35B-A3B"), 1, tmp_path / "fp8", "--weights", "fp8")
    rc, out, _ = plan(capsys, *argv)
    assert rc == 0 and "no Serve YAML is written" in out and not (tmp_path / "fp8").exists()


def test_ep_sizes_split_the_cluster_evenly():
    assert ep_sizes(2, 8, 512) == [1, 2, 4, 8, 16]
    # within a node powers of two (and the whole node); across nodes, whole nodes only
    assert ep_sizes(3, 8, 512) == [1, 2, 4, 8, 24]
    assert ep_sizes(1, 6, 256) == [1, 2, 6]
    # no rank without an expert; a dense model has none to split
    assert ep_sizes(2, 8, 8) == [1, 2, 4, 8] and ep_sizes(4, 8, 0) == [1]


def test_without_prefix_caching_a_sequence_takes_one_state_slot(capsys, tmp_path):
    name = "Qwen3.5-35B-A3B"
    f = plan_json(capsys, *cli(config(name), 1, tmp_path, "--no-prefix-caching"))
    e, n = f["engine"], f["engine"]["max_num_seqs"]
    assert e["enable_prefix_caching"] is False and f["state_slots_per_seq"] == 1
    assert e["state_memory_bytes"] == n * f["gdn_state_bytes_per_seq"]
    c = ModelConfig.from_hf(config(name))
    size = size_cache(c, EngineConfig(**e), torch.bfloat16, e["max_model_len"])
    assert (size.num_slots, size.num_snapshots) == (n, 0)


def test_a_dense_model_plans_a_replica_per_gpu(capsys, tmp_path):
    raw = tiny_config(True, 1024, {t: i for i, t in enumerate(SPECIAL_TOKENS)})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hw = "--nodes 1 --gpus-per-node 2 --gpu-memory 4GiB --context 1024 --reserve-gib 0".split()
    argv = ["--model", tmp_path, *hw, "--out", tmp_path / "o"]
    f = plan_json(capsys, *argv)
    assert [r["ep"] for r in f["ep_table"]] == [1] and f["ep_table"][0]["expert_bytes"] == 0
    lay = f["layout"]
    assert (lay["ep"], lay["replicas"], lay["prefill"], lay["decode"]) == (1, 2, 1, 1)
    args = yaml.safe_load((tmp_path / "o" / "serve.yaml").read_text())["applications"][0]["args"]
    assert args["prefill_server"]["num_gpus"] == args["decode_server"]["num_gpus"] == 1
    assert args["engine"]["max_num_seqs"] == 256  # the cap: the rest of the room is KV
