"""Comparison helpers of the kernel tests: relative RMS error and NaN-filled fresh buffers."""

import contextlib
import os

import pytest
import torch

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{name}: NaN (an element was never written)"
    err = rel_rms(out, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative RMS error {err:.2e} > {TOLERANCE[dtype]}"


@contextlib.contextmanager
def nan_filled_buffers():
    """Fresh float tensors (outputs and scratch) start as NaN, so an unwritten element fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def cu_seqlens(lens: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor(
        [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


# Triton kernels run on the GPU when there is one, else on CPU tensors under the interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)",
)
