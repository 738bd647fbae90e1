"""EngineConfig.cuda_graphs: decode steps replayed from CUDA graphs per batch-size bucket.

On CPU the graphs' function runs eagerly on the static buffers (capture=False): padded
batches, the scratch slot and block next to live ones, block tables filled per step, a batch
that shrinks and grows, preemption and prefix-cache hits give the greedy tokens of the normal
path, and the recorded step makes no host sync (run on the Triton kernels, as on a GPU). The
`gpu` tests capture real graphs and compare them with eager steps.
"""

import pytest
import torch
import transformers
from engine_fixtures import prompt
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton.runtime.jit import KernelInterface

from qwen35_ray.engine.cache_sizing import resolve_max_model_len, size_cache
from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.cuda_graph import DecodeGraphs, batch_buckets, build, uses_cuda_graphs
from qwen35_ray.engine.executor import InProcessExecutor
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import model_fingerprint
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.batch import SeqChunk
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.weights import tensor_fingerprint

GREEDY = dict(temperature=0, ignore_eos=True)
# six running slots: buckets 1, 2, 4, 6; no prefix caching, so the scratch slot (6) is next to
# the highest running one; 30 blocks of 4 tokens run out, so requests are preempted and the
# highest block (29, next to the scratch block 30) is handed out
TIGHT = dict(
    max_num_seqs=6, block_size=4, num_kv_blocks=30, max_model_len=64, enable_prefix_caching=False
)


def graphed_engine(name: str, kernels: str = "torch", dtype=torch.float32, device="cpu",
                   capture: bool = False, **kw):  # fmt: skip
    """An engine whose decode steps go through DecodeGraphs; on CPU with capture=False they
    run the graphs' function eagerly on its static buffers."""
    ec = EngineConfig(kernels=kernels, compile_decode=False, **kw)
    model, config, path = load_model(name, dtype=dtype, device=device, progress=False,
                                     kernels=kernels)  # fmt: skip
    size = size_cache(config, ec, dtype, resolve_max_model_len(config, ec))
    max_len = resolve_max_model_len(config, ec)
    cache, graphs = build(model, config, size, ec.block_size, max_len, dtype, device, capture)
    executor = InProcessExecutor(model, config, cache, device, graphs=graphs)
    fingerprint = model_fingerprint(config, dtype, tensor_fingerprint(model))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    engine = LLMEngine(model, config, tok, ec, path, device, executor=executor, dtype=dtype,
                       fingerprint=fingerprint)  # fmt: skip
    return engine, graphs


def eager_engine(name: str, kernels: str = "torch", dtype=torch.float32, device="cpu", **kw):
    return LLMEngine.from_pretrained(name, dtype=dtype, device=device, kernels=kernels,
                                     compile_decode=False, cuda_graphs=False, **kw)  # fmt: skip


def run(engine: LLMEngine, requests: dict) -> dict:
    """Each request's tokens; requests given as {id: (prompt, params, step to add it at)}."""
    pending = sorted(requests.items(), key=lambda kv: kv[1][2])
    done, step = {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][2] <= step:
            rid, (ids, params, _) = pending.pop(0)
            engine.add_request(rid, ids, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return done


def shrink_and_grow() -> dict:
    """Six requests in the six slots ending one after another, the one in slot 5 (next to the
    scratch slot) last: the batch shrinks through 6, 5, 4, 3, 2, 1 (padded to 6, 6, 4, 4, 2,
    1); then three more join one by one (it grows again)."""
    requests = {
        f"r{i}": (prompt(3 + 3 * i, seed=i), SamplingParams(max_tokens=2 + 2 * i, **GREEDY), 0)
        for i in range(6)
    }
    for i in range(3):
        requests[f"late{i}"] = (prompt(6 + i, seed=20 + i), SamplingParams(max_tokens=9, **GREEDY),
                                14 + i)  # fmt: skip
    return requests


def preempting() -> dict:
    """Six requests that fill the six slots and outgrow the 30 blocks of TIGHT."""
    return {
        f"p{i}": (prompt(9 + i, seed=40 + i), SamplingParams(max_tokens=14, **GREEDY), 0)
        for i in range(6)
    }


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(36) == [1, 2, 4, 8, 16, 24, 32, 36]


def test_the_setting():
    model, _, _ = load_model("qwen35-tiny", dtype="float32", progress=False)
    # auto: on for CUDA on the Triton kernels, off on CPU and on the torch kernels
    assert not uses_cuda_graphs(None, "cpu", model)
    assert not uses_cuda_graphs(None, "cuda", model)  # loaded on CPU: the torch kernels
    on_triton, _, _ = load_model("qwen35-tiny", dtype="float32", progress=False, kernels="triton")
    assert uses_cuda_graphs(None, "cuda", on_triton)
    assert not uses_cuda_graphs(False, "cuda", model)
    with pytest.raises(ValueError, match="cuda_graphs=True .* device='cpu'"):
        uses_cuda_graphs(True, "cpu", model)
    with pytest.raises(ValueError, match="cuda_graphs=True .*kernels='torch'"):
        uses_cuda_graphs(True, "cuda", model)
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        LLMEngine.from_pretrained("qwen35-tiny", cuda_graphs=True)


@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_padded_steps_give_the_tokens_of_the_eager_path(name):
    engine, graphs = graphed_engine(name, **TIGHT)
    for requests in (shrink_and_grow(), preempting()):
        expected = run(eager_engine(name, **TIGHT), requests)
        assert run(engine, requests) == expected
    # padded buckets ran, and sequences were preempted and ran again
    assert graphs.steps[6] > 0 and graphs.steps[4] > 0 and graphs.steps[2] > 0
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache_manager.is_empty
    # padding rows ran in the scratch slot and block, nowhere else
    cache = engine.executor.cache
    assert cache.recurrent[:, graphs.scratch_slot].abs().sum() > 0
    assert cache.key[:, graphs.scratch_block].abs().sum() > 0


def test_the_expert_load_closes_each_step():
    """A graph records the MoE layers' counting, not the closing of the step: each step still
    closes once, and the counts are the eager ones plus the padding rows' routes."""
    engine, graphs = graphed_engine("qwen35-tiny", **TIGHT)
    eager = eager_engine("qwen35-tiny", **TIGHT)
    requests = shrink_and_grow()
    assert run(engine, requests) == run(eager, requests)
    got, expected = engine.executor.expert_load(), eager.executor.expert_load()
    assert graphs.padding_rows > 0 and got.steps == expected.steps
    config = engine.config
    padding = graphs.padding_rows * config.num_experts_per_tok * sum(config.moe_layers)
    assert int(got.counts.sum()) == int(expected.counts.sum()) + padding


def test_padded_steps_after_prefix_cache_hits():
    """Prefix caching on: the scratch slot follows the snapshot slots, and requests that start
    from a snapshot decode in padded batches beside others."""
    kw = dict(max_num_seqs=3, block_size=4)
    base = prompt(16, seed=7)
    requests = {
        "a": (base, SamplingParams(max_tokens=12, **GREEDY), 0),
        "b": (base + prompt(3, seed=8), SamplingParams(max_tokens=7, **GREEDY), 3),
        "c": (base + prompt(5, seed=9), SamplingParams(max_tokens=5, **GREEDY), 3),
    }
    engine, graphs = graphed_engine("qwen35-tiny", **kw)
    got = run(engine, requests)
    assert got == run(eager_engine("qwen35-tiny", **kw), requests)
    assert engine.scheduler.counters()["prefix_cache_hits_total"] > 0
    assert graphs.scratch_slot == 2 * 3
    assert graphs.steps[3] > 0


@pytest.mark.slow  # the Triton kernels interpreted through the graphs' buffers
def test_triton_kernels_through_the_static_buffers():
    """The GPU's code (Triton kernels, here under the interpreter) through padded steps."""
    kw = dict(max_num_seqs=4, block_size=4, enable_prefix_caching=False)
    requests = {
        f"t{i}": (prompt(4 + i, seed=60 + i), SamplingParams(max_tokens=3 - i // 2, **GREEDY), 0)
        for i in range(3)
    }
    engine, graphs = graphed_engine("qwen35-tiny", kernels="triton", **kw)
    assert run(engine, requests) == run(eager_engine("qwen35-tiny", "triton", **kw), requests)
    # three sequences padded to four, then two
    assert graphs.steps == {1: 0, 2: 1, 4: 1}


class HostSyncs(TorchDispatchMode):
    """The ops of a step that a CUDA graph cannot capture: a device value read on the host,
    an output sized by device values, a tensor made from host data. Triton's launches are left
    out (under the interpreter they run on the host; on a GPU they are kernels)."""

    # aten ops that read a device tensor back to the host (item, bool, int), or size their
    # output by its values
    SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "bincount",
             "masked_select", "unique_dim", "_unique2", "unique_consecutive"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if name in self.SYNCS:
            self.seen.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.seen.append("repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.seen.append(f"{name} by a bool mask")
        return func(*args, **kwargs)


class HostData(TorchFunctionMode):
    """Tensors made from, or read into, host data, and new tensors without a device (on a
    GPU engine they would be CPU tensors)."""

    CALLS = {"tensor", "as_tensor", "from_numpy", "tolist", "cpu", "numpy", "item"}
    FACTORIES = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "eye"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        if name in self.CALLS:
            self.seen.append(name)
        elif name in self.FACTORIES and kwargs.get("device") is None:
            self.seen.append(f"{name} without device")
        return func(*args, **kwargs)


@pytest.fixture
def launches_unwatched(monkeypatch):
    launch = KernelInterface.__getitem__

    def unwatched(self, grid):
        run = launch(self, grid)

        def call(*args, **kwargs):
            with _disable_current_modes(), torch._C.DisableTorchFunction():
                return run(*args, **kwargs)

        return call

    monkeypatch.setattr(KernelInterface, "__getitem__", unwatched)


@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_the_recorded_step_makes_no_host_sync(name, launches_unwatched):
    """The function a graph records, on the Triton kernels, over live rows and padding."""
    engine, graphs = graphed_engine(name, kernels="triton", max_num_seqs=4, block_size=4)
    chunks = [SeqChunk(5, 1, 0, [3, 1]), SeqChunk(9, 1, 2, [0, 2, 4])]
    N = graphs.bucket(chunks)
    assert N == 2
    graphs._fill(4, chunks, [11, 12])
    syncs, data = HostSyncs(), HostData()
    with torch.inference_mode(), data, syncs:
        graphs._forward(4)
    assert syncs.seen == [] and data.seen == []
    # and the detector sees what it is meant to see
    with torch.inference_mode(), HostData() as data, HostSyncs() as syncs:
        torch.tensor([1]).tolist()
        bool(torch.ones(1, device="cpu").all())
        torch.bincount(torch.arange(3))
    assert data.seen == ["tensor", "tolist", "arange without device"]
    assert syncs.seen == ["is_nonzero", "bincount"]


def test_steps_the_graphs_leave_to_the_eager_path():
    _, graphs = graphed_engine("qwen35-tiny-dense", max_num_seqs=4, block_size=4,
                               max_model_len=64)  # fmt: skip
    # tables hold the 16 blocks of a 64-token sequence
    assert graphs.max_blocks == 16
    decode = SeqChunk(5, 1, 0, [1, 2])
    assert graphs.bucket([decode] * 3) == 4
    assert graphs.bucket([decode] * 5) is None  # more sequences than the largest bucket
    assert graphs.bucket([decode, SeqChunk(5, 2, 1, [3, 4])]) is None  # a prefill chunk
    assert graphs.bucket([SeqChunk(0, 1, 1, [3])]) is None  # a first token
    assert graphs.bucket([SeqChunk(5, 1, 0, list(range(17)))]) is None  # past the tables
    assert graphs.bucket([]) is None


def test_a_scratch_slot_outside_the_cache_is_refused():
    engine, graphs = graphed_engine("qwen35-tiny-dense", max_num_seqs=2)
    cache = engine.executor.cache
    with pytest.raises(ValueError, match="scratch slot"):
        DecodeGraphs(engine.executor.model, cache, 2, 4, cache.num_slots, 0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def at_bucket_sizes() -> dict:
    """Decode batches of exactly 4, 2 and 1 sequences, the buckets of max_num_seqs=4: graphed
    and eager steps have the same shapes, so the same kernels give the same bits in bf16."""
    maxes = [3, 3, 6, 9]
    return {
        f"e{i}": (prompt(5 + i, seed=80 + i), SamplingParams(max_tokens=m, **GREEDY), 0)
        for i, m in enumerate(maxes)
    }


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_captured_graphs_give_the_eager_tokens(name):
    """Real graphs on the GPU in fp32 (padded buckets, a batch that shrinks and grows,
    preemption) against the eager steps of the same kernels."""
    engine, graphs = graphed_engine(name, "auto", torch.float32, "cuda", capture=True, **TIGHT)
    assert graphs.captured
    for requests in (shrink_and_grow(), preempting()):
        expected = run(eager_engine(name, "auto", torch.float32, "cuda", **TIGHT), requests)
        assert run(engine, requests) == expected
    assert graphs.steps[6] > 0 and graphs.steps[4] > 0 and graphs.steps[1] > 0
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_captured_graphs_give_the_eager_tokens_in_bf16(name):
    kw = dict(max_num_seqs=4, block_size=4, enable_prefix_caching=False)
    engine, graphs = graphed_engine(name, "auto", torch.bfloat16, "cuda", capture=True, **kw)
    requests = at_bucket_sizes()
    expected = run(eager_engine(name, "auto", torch.bfloat16, "cuda", **kw), requests)
    assert run(engine, requests) == expected
    assert graphs.steps[4] > 0 and graphs.steps[2] > 0 and graphs.steps[1] > 0


@pytest.mark.gpu
@needs_cuda
def test_captured_graphs_after_prefix_cache_hits():
    kw = dict(max_num_seqs=3, block_size=4)
    base = prompt(16, seed=7)
    requests = {
        "a": (base, SamplingParams(max_tokens=12, **GREEDY), 0),
        "b": (base + prompt(3, seed=8), SamplingParams(max_tokens=7, **GREEDY), 3),
        "c": (base + prompt(5, seed=9), SamplingParams(max_tokens=5, **GREEDY), 3),
    }
    engine, graphs = graphed_engine("qwen35-tiny", "auto", torch.float32, "cuda", True, **kw)
    got = run(engine, requests)
    assert got == run(eager_engine("qwen35-tiny", "auto", torch.float32, "cuda", **kw), requests)
    assert engine.scheduler.counters()["prefix_cache_hits_total"] > 0


@pytest.mark.gpu
@needs_cuda
def test_llm_with_cuda_graphs_on():
    """The engine's own switch: cuda_graphs=True captures at start-up and decodes through the
    graphs; the tokens are those of cuda_graphs=False."""
    kw = dict(dtype="float32", device="cuda", max_num_seqs=4, block_size=4)
    on = LLMEngine.from_pretrained("qwen35-tiny", cuda_graphs=True, **kw)
    graphs = on.executor.runner.decode_graphs
    assert graphs is not None and graphs.captured
    requests = {f"q{i}": (prompt(5 + i, seed=i), SamplingParams(max_tokens=6, **GREEDY), 0)
                for i in range(3)}  # fmt: skip
    off = LLMEngine.from_pretrained("qwen35-tiny", cuda_graphs=False, **kw)
    assert run(on, requests) == run(off, requests)
    assert sum(graphs.steps.values()) > 0


@pytest.mark.gpu
@needs_cuda
def test_the_bench_comparison():
    from qwen35_ray.bench.decode_graphs import compare

    out = compare("qwen35-tiny", "float32", batch_sizes=(1, 4), new_tokens=6, block_size=4)
    assert out["tokens_equal_B1"] and out["tokens_equal_B4"]
    assert out["decode_step_B4_ms_graphs"] > 0 and out["decode_step_B4_ms_eager"] > 0
