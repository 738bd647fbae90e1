"""Chunked gated delta rule (prefill) against the token-by-token fp32 recurrence."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_asserts import (
    DTYPES,
    TRITON_DEVICE,
    assert_close,
    cu_seqlens,
    nan_filled_buffers,
    needs_triton,
)
from qwen35_kernels.gdn import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_triton,
    chunk_gated_delta_rule_with_gating,
    gdn_gating,
)
from qwen35_kernels.gdn.chunk_triton import _chunk_fwd
from qwen35_kernels.gdn.naive import naive_recurrent_gated_delta_rule

LENS = [63, 65, 1, 7]  # ragged, one short of a chunk, one past it, a single token
H, HV, K, V, SLOTS = 2, 4, 16, 32, 6


def _inputs(dtype, device):
    torch.manual_seed(42)
    T = sum(LENS)
    x = {
        "q": torch.randn(T, H, K, dtype=dtype),
        "k": torch.randn(T, H, K, dtype=dtype),
        "v": torch.randn(T, HV, V, dtype=dtype),
        "a": torch.randn(T, HV, dtype=dtype),
        "b": torch.randn(T, HV, dtype=dtype),
        "A_log": torch.rand(HV).log(),
        "dt_bias": torch.randn(HV),
        "state": torch.randn(SLOTS, HV, K, V),
        "state_indices": torch.tensor([4, 0, 5, 2], dtype=torch.int32),
        "has_initial_state": torch.tensor([True, False, True, True]),
        "cu_seqlens": cu_seqlens(LENS),
    }
    x["g"], x["beta"] = gdn_gating(x["a"], x["b"], x["A_log"], x["dt_bias"])
    return {n: t.to(device) for n, t in x.items()}


def _check(x, o, state, dtype):
    x = {n: t.cpu() for n, t in x.items()}
    o, state = o.cpu(), state.cpu()
    bounds = x["cu_seqlens"].tolist()
    for i, slot in enumerate(x["state_indices"].tolist()):
        s, e = bounds[i], bounds[i + 1]
        h0 = x["state"][slot] if x["has_initial_state"][i] else None
        ref_o, ref_h = naive_recurrent_gated_delta_rule(
            *(x[n][s:e] for n in ("q", "k", "v", "g", "beta")), initial_state=h0
        )
        assert_close(f"o of sequence {i}", o[s:e], ref_o.float(), dtype)
        assert_close(f"final state of sequence {i}", state[slot], ref_h, dtype)
    untouched = sorted(set(range(SLOTS)) - set(x["state_indices"].tolist()))
    assert torch.equal(state[untouched], x["state"][untouched]), "a slot outside the batch changed"


def _args(x, state):
    return (x["cu_seqlens"], state, x["state_indices"], x["has_initial_state"])


@pytest.mark.parametrize("chunk_size", [None, 64, 16], ids=["cpu-default", "C64", "C16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_gated_delta_rule(dtype, chunk_size):
    """The PyTorch path at its CPU default chunk (32), at the Triton one and below both."""
    x = _inputs(dtype, "cpu")
    state = x["state"].clone()
    qkv = (x[n] for n in ("q", "k", "v", "g", "beta"))
    o = chunk_gated_delta_rule(*qkv, *_args(x, state), chunk_size=chunk_size)
    _check(x, o, state, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_gated_delta_rule_triton(dtype):
    x = _inputs(dtype, TRITON_DEVICE)
    state = x["state"].clone()
    with nan_filled_buffers():
        o = chunk_gated_delta_rule_triton(
            *(x[n] for n in ("q", "k", "v", "g", "beta")), *_args(x, state)
        )
    _check(x, o, state, dtype)


def test_chunk_gated_delta_rule_with_gating():
    x = _inputs(torch.float32, "cpu")
    state = x["state"].clone()
    gates = (x[n] for n in ("a", "b", "A_log", "dt_bias"))
    o = chunk_gated_delta_rule_with_gating(x["q"], x["k"], x["v"], *gates, *_args(x, state))
    _check(x, o, state, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_gated_delta_rule_triton_with_gating(dtype):
    """g and beta computed inside the kernel from a, b, A_log and dt_bias."""
    x = _inputs(dtype, TRITON_DEVICE)
    state = x["state"].clone()
    with nan_filled_buffers():
        o = chunk_gated_delta_rule_triton(
            x["q"], x["k"], x["v"], None, None, *_args(x, state),
            a=x["a"], b=x["b"], A_log=x["A_log"], dt_bias=x["dt_bias"],
        )  # fmt: skip
    _check(x, o, state, dtype)


@needs_triton
def test_chunk_gated_delta_rule_triton_without_l2norm():
    x = _inputs(torch.float32, TRITON_DEVICE)
    # unnormalised keys need a small scale to keep the recurrence stable
    x["k"] = x["k"] * 0.1
    state = x["state"].clone()
    qkv = (x[n] for n in ("q", "k", "v", "g", "beta"))
    o = chunk_gated_delta_rule_triton(*qkv, *_args(x, state), use_qk_l2norm=False)
    xc = {n: t.cpu() for n, t in x.items()}
    bounds = xc["cu_seqlens"].tolist()
    for i, slot in enumerate(xc["state_indices"].tolist()):
        s, e = bounds[i], bounds[i + 1]
        h0 = xc["state"][slot] if xc["has_initial_state"][i] else None
        ref_o, ref_h = naive_recurrent_gated_delta_rule(
            *(xc[n][s:e] for n in ("q", "k", "v", "g", "beta")), h0, use_qk_l2norm=False
        )
        assert_close(f"o of sequence {i}", o.cpu()[s:e], ref_o, torch.float32)
        assert_close(f"final state of sequence {i}", state.cpu()[slot], ref_h, torch.float32)


@contextlib.contextmanager
def _programs_in_reverse():
    """The interpreter runs a launch's programs one after another in grid order; this runs
    them in the reverse order."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    set_grid_idx = builder.set_grid_idx

    def reverse(self, x, y, z):
        nx, ny, nz = self.grid_dim
        set_grid_idx(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    builder.set_grid_idx = reverse
    try:
        yield
    finally:
        builder.set_grid_idx = set_grid_idx


@pytest.mark.skipif(
    TRITON_DEVICE != "cpu", reason="orders programs through the CPU interpreter; on a GPU "
    "test_kernels_gpu.py checks that two runs give the same bits"
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_gated_delta_rule_triton_program_order(dtype):
    """No program reads what another program of the same launch writes: every launch gives
    the same bits, intermediates included, with its programs run in reverse. On a GPU the
    programs of a launch run in no fixed order, so a dependency between them is a race."""
    x = _inputs(dtype, TRITON_DEVICE)
    runs = []
    for order in (contextlib.nullcontext(), _programs_in_reverse()):
        state = x["state"].clone()
        with order, nan_filled_buffers():
            o, stages, _ = _chunk_fwd(
                *(x[n] for n in ("q", "k", "v", "g", "beta")), *_args(x, state),
                None, True, 64, None, None, None, None,
            )  # fmt: skip
        runs.append({"o": o, "state": state, **stages})
    for name, first in runs[0].items():
        assert torch.equal(first, runs[1][name]), f"{name} depends on the order of programs"


def _has_nvidia_toolchain() -> bool:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_nvidia_toolchain(), reason="this Triton wheel has no NVIDIA backend tools"
)  # fmt: skip
def test_chunk_gated_delta_rule_triton_compiles_for_sm90():
    """Every launch compiles for an H100/H200 at Qwen3.5-397B's GDN shapes in bf16 (H=16,
    HV=64, K=V=128) with nothing spilled to local memory, and the chunk-parallel launches
    (kkt, wu, fwd_o) reach the tensor cores through wgmma. Done on CPU with Triton's own
    ptxas, so a GPU run does not find a compile error or a register spill first."""
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run(
        [sys.executable, str(script), "gdn_chunk"], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    launches = json.loads(run.stdout.strip().splitlines()[-1])
    names = [x["kernel"] for x in launches]
    assert len(names) == 8, names  # rstd twice (q, k), then gates to fwd_o
    for x in launches:
        assert x["stack_bytes"] == 0, f"{x['kernel']} spills: {x}"
        if x["kernel"].split("_")[2] in ("kkt", "wu") or x["kernel"].endswith("fwd_o_kernel"):
            assert x["wgmma"] > 0, f"{x['kernel']} misses the wgmma tensor cores: {x}"
