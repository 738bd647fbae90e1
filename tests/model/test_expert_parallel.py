"""Expert parallelism: N rank processes (gloo, one torch thread each) each hold a share of the
routed experts and run their own sequences; every rank's logits equal the one-process model's
on the same sequences, a rank with nothing to do included. Checkpoints: the tiny model (16
experts, fused tensors) and a random transformers qwen3_5_moe (8 experts per tensor, uneven
over 3 ranks)."""

import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_reference import hf_model, save
from model_driver import Driver
from qwen35_kernels.moe.naive import naive_moe
from test_weights import quantize_fp8, rewrite

from qwen35_ray.model import weights
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.expert_load import ExpertLoadSnapshot
from qwen35_ray.model.expert_parallel import ExpertParallel, ExpertShard, expert_ranges
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.qwen35 import Qwen35ForCausalLM
from qwen35_ray.model.weights import CheckpointError

# fp32 rounding only: the one-process kernels sum a token's experts in another order (dense,
# gathered or per-expert paths by batch size); 4e-5 measured on logits of magnitude 4. A wrong
# expert or weight moves logits by O(1).
TOL = 1e-4


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# per step, what each of up to 3 ranks runs ({sequence: new tokens}, decodes first), or None:
# an idle step. Each rank's sequences are its own (own cache), as in data-parallel attention.
STEPS = [
    [{0: tokens(20, 1), 1: tokens(7, 2)}, {0: tokens(13, 3)}, None],
    [{0: tokens(1, 4), 1: tokens(1, 5), 2: tokens(9, 6)}, None, {0: tokens(5, 7)}],
    [{0: tokens(1, 8), 2: tokens(1, 9)}, {0: tokens(1, 10), 1: tokens(40, 11)}, {0: tokens(1, 12)}],
]


SKEWED_DTYPES = [torch.float32, torch.bfloat16]


def skewed_case(rank: int, world: int, dtype: torch.dtype):
    """Every rank's tokens choose only rank 0's experts, so the other ranks receive nothing;
    the last rank has no tokens. (x, w_gate_up, w_down, weights, ids) with all 8 experts."""
    g = torch.Generator().manual_seed(7)
    E, H, I, k = 8, 16, 8, 2
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    g.manual_seed(rank)
    T = 0 if rank == world - 1 else 5 + rank
    x = torch.randn(T, H, generator=g)
    # k distinct experts per token among rank 0's
    ids = torch.rand(T, ExpertShard(0, world, E).stop, generator=g).argsort(1)[:, :k]
    weights = torch.softmax(torch.randn(T, k, generator=g), -1)
    x, w_gate_up, w_down, weights = (t.to(dtype) for t in (x, w_gate_up, w_down, weights))
    return x, w_gate_up, w_down, weights, ids


def _skewed(rank: int, world: int, dtype: torch.dtype) -> torch.Tensor:
    x, w_gate_up, w_down, weights, ids = skewed_case(rank, world, dtype)
    shard = ExpertShard(rank, world, w_gate_up.shape[0])
    local = slice(shard.start, shard.stop)
    return ExpertParallel(shard)(x, w_gate_up[local], w_down[local], weights, ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, paths: dict, out: str) -> None:
    torch.set_num_threads(1)
    # a rank that fails leaves its peers waiting in a collective: not for gloo's 30 minutes
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    results = {}
    try:
        for name, path in paths.items():
            E = ModelConfig.from_hf(path).num_experts
            model, config, _ = load_model(
                path, dtype="float32", progress=False, expert_shard=ExpertShard(rank, world, E)
            )
            driver = Driver(model, config)
            logits = []
            # inference tensors, as the engine's runner makes them
            with torch.inference_mode():
                for step in STEPS:
                    pieces = step[rank]
                    if pieces is None:
                        model.idle_forward()
                        logits.append(None)
                    else:
                        logits.append(driver.step(pieces)[0])
            results[name] = {
                "logits": logits,
                "stats": model.expert_parallel.stats(),
                "load": model.expert_load.snapshot(),
                "resident": model.resident_expert_bytes(),
                "total": model.total_expert_bytes(),
            }
        results["skewed"] = {dtype: _skewed(rank, world, dtype) for dtype in SKEWED_DTYPES}
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}/{rank}.pt")
    # Leave without finalizing the interpreter. A gloo worker thread may not yet have released
    # the last all_to_all's tensors; if it takes the GIL for that during Py_FinalizeEx, the thread
    # is torn down inside a noexcept frame and the process aborts ("terminate called without an
    # active exception"; CI on 676beb3, and 1 in about 60 runs here, core dump: ~AsyncAlltoallWork
    # in ProcessGroupGloo::runLoop). Everything this rank owes is in the file above. The engine's
    # rank actors never exit this way: Ray kills them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    _, _, tiny = load_model("qwen35-tiny", dtype="float32", progress=False)
    hf = save(hf_model("qwen3_5_moe"), tmp_path_factory.mktemp("hf_moe"))
    return {"tiny": str(tiny), "hf": str(hf)}


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The one-process model run on each rank's steps: {name: per rank (per step logits,
    expert load snapshot)}."""
    out = {}
    for name, path in checkpoints.items():
        model, config, _ = load_model(path, dtype="float32", progress=False)
        out[name] = []
        for rank in range(3):
            model.expert_load.reset()
            driver = Driver(model, config)
            logits = [None if s[rank] is None else driver.step(s[rank])[0] for s in STEPS]
            out[name].append((logits, model.expert_load.snapshot()))
    return out


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, checkpoints, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"ep{world}")
    mp.spawn(_rank, args=(world, free_port(), checkpoints, str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name", ["tiny", "hf"])
def test_every_rank_matches_the_single_process_model(ranks, reference, name):
    world, results = ranks
    for rank, result in enumerate(results):
        expected = reference[name][rank][0]
        for step, (got, want) in enumerate(zip(result[name]["logits"], expected)):
            assert (got is None) == (want is None)
            if got is None:
                continue
            for seq in want:
                torch.testing.assert_close(
                    got[seq], want[seq], atol=TOL, rtol=0, msg=f"rank {rank} step {step}"
                )


@pytest.mark.parametrize("name", ["tiny", "hf"])
def test_each_rank_holds_its_share_of_the_experts(ranks, checkpoints, name):
    world, results = ranks
    E = ModelConfig.from_hf(checkpoints[name]).num_experts
    total = results[0][name]["total"]
    for (start, stop), result in zip(expert_ranges(E, world), results):
        assert result[name]["total"] == total
        assert result[name]["resident"] == total * (stop - start) // E
    assert sum(r[name]["resident"] for r in results) == total


def test_exchange_is_counted_and_idle_ranks_take_part(ranks, checkpoints):
    world, results = ranks
    moe_layers = sum(ModelConfig.from_hf(checkpoints["tiny"]).moe_layers)
    for result in results:
        stats = result["tiny"]["stats"]
        # counts, rows out, results back: per MoE layer and step, idle steps too
        assert stats["all_to_all_calls"] == 3 * moe_layers * len(STEPS)
        assert stats["all_to_all_bytes"] > 0 and stats["all_to_all_seconds"] > 0


@pytest.mark.parametrize("name", ["tiny", "hf"])
def test_ranks_expert_loads_add_up_to_the_whole(ranks, reference, name):
    """Each rank counts its own tokens' routing; the group's load is their sum, the same as one
    process running every rank's tokens."""
    world, results = ranks
    loads = [r[name]["load"] for r in results]
    for rank, load in enumerate(loads):
        # idle steps count as steps: the ranks' windows stay aligned
        assert load.steps == len(STEPS)
        assert torch.equal(load.counts, reference[name][rank][1].counts)
    merged = ExpertLoadSnapshot.merge(loads)
    assert merged.steps == len(STEPS)
    assert torch.equal(merged.counts, sum(reference[name][r][1].counts for r in range(world)))


@pytest.mark.parametrize("dtype", SKEWED_DTYPES, ids=str)
def test_ranks_that_receive_no_rows_or_send_none(ranks, dtype):
    world, results = ranks
    for rank, result in enumerate(results):
        x, w_gate_up, w_down, weights, ids = skewed_case(rank, world, dtype)
        want = naive_moe(x, w_gate_up, w_down, weights, ids)
        got = result["skewed"][dtype]
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.float(), want, **({} if dtype == torch.float32 else BF16))


# one bf16 rounding of each expert's output and of the sum, against the fp32 reference
BF16 = dict(atol=2e-2, rtol=2e-2)


def test_shard_ranges_are_contiguous_and_uneven_splits_go_first():
    assert ExpertShard(0, 3, 16).expert_ranges() == [(0, 6), (6, 11), (11, 16)]
    assert [(s.start, s.stop) for s in (ExpertShard(r, 3, 8) for r in range(3))] == [
        (0, 3),
        (3, 6),
        (6, 8),
    ]
    assert ExpertShard(1, 3, 8).owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert ExpertShard(2, 3, 8).num_local == 2


@pytest.mark.parametrize(
    "args, match",
    [((0, 5, 4), "expert_parallel_size=5"), ((2, 2, 8), "rank 2"), ((0, 2, 0), "dense")],
)
def test_bad_shard_is_a_clear_error(args, match):
    with pytest.raises(ValueError, match=match):
        ExpertShard(*args)


def test_mtp_under_expert_parallelism_is_refused(checkpoints):
    config = ModelConfig.from_hf(checkpoints["tiny"])
    with torch.device("meta"), pytest.raises(ValueError, match="with_mtp"):
        Qwen35ForCausalLM(config, with_mtp=True, expert_shard=ExpertShard(0, 2, 16))


class ReadLog:
    """safe_open as weights.py calls it, noting the tensors read whole and those sliced."""

    def __init__(self, monkeypatch):
        self.whole, self.sliced = set(), set()
        real = weights.safe_open
        log = self

        class Handle:
            def __init__(self, path, framework):
                self.f = real(path, framework)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                log.whole.add(name)
                return self.f.get_tensor(name)

            def get_slice(self, name):
                log.sliced.add(name)
                return self.f.get_slice(name)

        monkeypatch.setattr(weights, "safe_open", Handle)


def experts_of(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts." in n}


def per_expert_fp8(src, dst):
    """The FP8 releases' layout: each expert's projections block-quantised on their own."""

    def quantize(tensors):
        out = dict(tensors)
        for name, t in tensors.items():
            if ".mlp.experts." in name:
                out[name], out[name + "_scale_inv"] = quantize_fp8(t, FP8_BLOCK)
        return out

    path = rewrite(src, dst, quantize)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "activation_scheme": "dynamic",
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


FP8_BLOCK = 16


@pytest.mark.parametrize("layout", ["fused", "per_expert", "per_expert_fp8"])
def test_a_rank_reads_only_its_experts(checkpoints, layout, tmp_path, monkeypatch):
    path = checkpoints["tiny" if layout == "fused" else "hf"]
    if layout == "per_expert_fp8":
        path = per_expert_fp8(Path(path), tmp_path / "fp8")
    full, config, _ = load_model(path, dtype="float32", progress=False)
    E = config.num_experts
    for rank in range(3):
        shard = ExpertShard(rank, 3, E)
        reads = ReadLog(monkeypatch)
        model, _, _ = load_model(path, dtype="float32", progress=False, expert_shard=shard)
        for name, p in experts_of(model).items():
            assert torch.equal(p, experts_of(full)[name][shard.start : shard.stop]), name
        others = [e for e in range(E) if e not in range(shard.start, shard.stop)]
        read = reads.whole | reads.sliced
        assert not [n for n in read for e in others if f".experts.{e}." in n]
        fused = {n for n in read if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        assert fused <= reads.sliced and bool(fused) == (layout == "fused")
        assert model.resident_expert_bytes() == full.total_expert_bytes() * shard.num_local // E


def test_only_the_ranks_own_experts_must_be_present(checkpoints, tmp_path):
    victim = "model.language_model.layers.2.mlp.experts.7.up_proj.weight"
    broken = rewrite(
        Path(checkpoints["hf"]), tmp_path / "broken", lambda t: {n: t[n] for n in t if n != victim}
    )
    load_model(broken, dtype="float32", progress=False, expert_shard=ExpertShard(0, 3, 8))
    with pytest.raises(CheckpointError, match=f"missing tensor {victim.replace('.', '[.]')}"):
        load_model(broken, dtype="float32", progress=False, expert_shard=ExpertShard(2, 3, 8))
