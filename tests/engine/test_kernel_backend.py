"""EngineConfig.kernels: the Triton kernels (on CPU under Triton's interpreter, as conftest sets
it) generate the greedy tokens of the PyTorch paths through prefill, chunked prefill, decode, a
prefix-cache hit and an exported and imported request; the choice is made once, when the model
is built, and really routes every op to its side."""

import pytest
import torch
import triton.language as tl
from engine_fixtures import prompt
from triton.runtime.jit import KernelInterface

from qwen35_ray.engine.config import EngineConfig
from qwen35_ray.engine.decode_graph import CompiledDecode
from qwen35_ray.engine.executor import compiles_decode
from qwen35_ray.engine.llm_engine import LLMEngine
from qwen35_ray.engine.request_state import RequestState
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model import kernel_backend as kb
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.expert_parallel import ExpertShard
from qwen35_ray.model.kernel_backend import TORCH, TRITON, kernel_backend
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mlp import SparseMoE
from qwen35_ray.model.qwen35 import Qwen35ForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
# the Triton modules every model launches kernels from; the MoE model also the experts'
TRITON_MODULES = {
    "qwen35_kernels.attention.paged_triton",
    "qwen35_kernels.conv1d.causal_conv1d_triton",
    "qwen35_kernels.gdn.chunk_triton",
    "qwen35_kernels.gdn.fused_recurrent_triton",
    "qwen35_kernels.norm.rms_norm_triton",
}
MOE_MODULE = "qwen35_kernels.moe.fused_moe_triton"


def engine(name: str, kernels: str, device: str = "cpu") -> LLMEngine:
    # 4-token blocks and 8-token steps: a 10-token prompt prefills in two chunks, the second
    # beside another prompt, and they decode together. Few steps (6): under the interpreter
    # each costs seconds
    return LLMEngine.from_pretrained(
        name, dtype="float32", device=device, kernels=kernels, block_size=4,
        max_num_batched_tokens=8, long_prefill_token_threshold=0, compile_decode=False,
    )  # fmt: skip


def step_until(e: LLMEngine, steps: list, done: dict, request_id: str | None = None) -> None:
    """Step until request_id is exported (None: until nothing is left); every step's outputs
    are appended to `steps`, the finished and exported ones stored in `done`."""
    while e.has_unfinished() and request_id not in done:
        steps.append(e.step())
        for out in steps[-1]:
            if out.finished or out.request_state is not None:
                done[out.request_id] = out


def scenario(name: str, kernels: str, device: str = "cpu") -> dict:
    """Each request's tokens, the prompt tokens the prefix cache served and the engine steps,
    through one engine."""
    e, steps, done = engine(name, kernels, device), [], {}
    a = prompt(10, 1)
    e.add_request("a", a, GREEDY)
    e.add_request("b", prompt(3, 2), GREEDY)
    step_until(e, steps, done)
    # c hits the GDN states kept at a's last block boundary (8 tokens); d is prefilled beside
    # it (in two chunks, the second beside c's decode), exported, and imported back
    e.add_request("c", a[:8] + prompt(2, 3), GREEDY)
    e.add_request("d", prompt(5, 4), GREEDY, prefill_only=True)
    step_until(e, steps, done, "d")
    e.import_request(RequestState.from_bytes(done.pop("d").request_state.to_bytes()))
    step_until(e, steps, done)
    out = {rid: o.outputs[0].token_ids for rid, o in done.items()}
    out["c cached"] = done["c"].num_cached_tokens
    out["steps"] = len(steps)
    return out


@pytest.fixture
def launches(monkeypatch):
    """The modules of the Triton kernels launched while the test runs."""
    seen = set()
    launch = KernelInterface.__getitem__

    def counted(self, grid):
        seen.add(self.fn.__module__)
        return launch(self, grid)

    monkeypatch.setattr(KernelInterface, "__getitem__", counted)
    return seen


@pytest.mark.slow  # two engines on the Triton kernels, interpreted
@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_triton_kernels_generate_the_tokens_of_the_torch_paths(name, launches):
    reference = scenario(name, "torch")
    assert launches == set()
    assert reference["c cached"] == 8
    assert len(reference["d"]) == GREEDY.max_tokens
    got = scenario(name, "triton")
    expected = TRITON_MODULES | ({MOE_MODULE} if name == "qwen35-tiny" else set())
    assert expected <= launches
    assert got == reference


def test_the_choice_per_device():
    assert kernel_backend("auto", "cpu") is TORCH
    assert kernel_backend("auto", "cuda") is TRITON
    assert kernel_backend("torch", "cuda") is TORCH
    assert kernel_backend("triton", "cpu") is TRITON


def test_every_module_holds_the_backend_chosen_at_load():
    model, config, _ = load_model("qwen35-tiny", dtype="float32", progress=False, kernels="triton")
    holders = [m for m in model.modules() if hasattr(m, "kernels")]
    # the model, its norms, attention, GDN and MoE layers (the MTP head is not loaded)
    assert len(holders) > 3 * len(model.layers)
    assert all(m.kernels is TRITON for m in holders)
    moe = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert moe and all(m.routed is TRITON.fused_moe for m in moe)
    # an expert-parallel rank computes its shard's pairs with the same kernels
    with torch.device("meta"):
        shard = ExpertShard(0, 2, config.num_experts)
        rank = Qwen35ForCausalLM(config, expert_shard=shard, kernels=TRITON)
    assert rank.expert_parallel.experts is TRITON.fused_moe
    default, _, _ = load_model("qwen35-tiny", dtype="float32", progress=False)
    assert all(m.kernels is TORCH for m in default.modules() if hasattr(m, "kernels"))


def test_a_bad_value_names_the_field():
    with pytest.raises(ValueError, match="kernels='cuda' is not one of auto, torch, triton"):
        EngineConfig(kernels="cuda")
    with pytest.raises(ValueError, match="kernels='gpu'"):
        load_model("qwen35-tiny", progress=False, kernels="gpu")


def test_triton_on_cpu_without_the_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(kb, "INTERPRET", tl.constexpr(False))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1.*kernels='torch'"):
        kernel_backend("triton", "cpu")
    assert kernel_backend("triton", "cuda") is TRITON


def test_compiled_decode_stays_with_the_torch_kernels(monkeypatch):
    with pytest.raises(ValueError, match="compile_decode=True.*kernels='triton'"):
        EngineConfig(kernels="triton", compile_decode=True)
    monkeypatch.setenv("QWEN35_RAY_COMPILE_DECODE", "1")
    triton_model, config, _ = load_model("qwen35-tiny", progress=False, kernels="triton")
    torch_model, _, _ = load_model("qwen35-tiny", progress=False, kernels="torch")
    assert compiles_decode(None, "cpu", torch_model)
    assert not compiles_decode(None, "cpu", triton_model)
    with pytest.raises(ValueError, match="compile_decode=True.*compile_decode=False"):
        compiles_decode(True, "cpu", triton_model)
    cache = HybridCache.allocate(config, 2, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="PyTorch paths, and this model runs the triton"):
        CompiledDecode(triton_model, cache)


def test_an_engine_on_the_triton_kernels_reads_the_paged_blocks():
    e = LLMEngine.from_pretrained("qwen35-tiny-dense", dtype="float32", kernels="triton")
    assert e.executor.runner.compiled_decode is None
    # no DecodeKV copies: attention decodes from the paged blocks, as on a GPU
    assert e.executor.cache.decode_kv == []


def test_the_engine_refuses_a_model_loaded_with_other_kernels():
    model, config, path = load_model("qwen35-tiny-dense", dtype="float32", progress=False)
    with pytest.raises(ValueError, match="kernels='triton'.*load_model\\(..., kernels='triton'\\)"):
        LLMEngine(model, config, None, EngineConfig(kernels="triton"), path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_on_cuda_triton_and_auto_generate_the_tokens_of_torch(name, launches):
    reference = scenario(name, "torch", "cuda")
    assert launches == set()
    for kernels in ("triton", "auto"):
        assert scenario(name, kernels, "cuda") == reference, kernels
    assert TRITON_MODULES <= launches
