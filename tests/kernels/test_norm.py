"""Zero-centred and gated RMSNorm against the fp32 references."""

import pytest
import torch
from kernel_asserts import DTYPES, TRITON_DEVICE, assert_close, nan_filled_buffers, needs_triton
from qwen35_kernels.norm import gated_rms_norm, gated_rms_norm_triton, rms_norm, rms_norm_triton
from qwen35_kernels.norm.naive import naive_gated_rms_norm, naive_rms_norm

# 100 columns: not a power of two, so the row mask matters
SHAPE, EPS = (5, 3, 100), 1e-6


def _inputs(dtype, device):
    torch.manual_seed(42)
    x, z = torch.randn(*SHAPE, dtype=dtype), torch.randn(*SHAPE, dtype=dtype)
    w = (torch.randn(SHAPE[-1]) * 0.1).to(dtype)
    return x.to(device), z.to(device), w.to(device)


@pytest.mark.parametrize(
    "fn,device",
    [(rms_norm, "cpu"), pytest.param(rms_norm_triton, TRITON_DEVICE, marks=needs_triton)],
    ids=["rms_norm", "rms_norm_triton"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(fn, device, dtype):
    x, _, w = _inputs(dtype, device)
    with nan_filled_buffers():
        out = fn(x, w, EPS)
    assert out.dtype == dtype
    assert_close(fn.__name__, out, naive_rms_norm(x.cpu(), w.cpu(), EPS), dtype)


@pytest.mark.parametrize(
    "fn,device",
    [
        (gated_rms_norm, "cpu"),
        pytest.param(gated_rms_norm_triton, TRITON_DEVICE, marks=needs_triton),
    ],
    ids=["gated_rms_norm", "gated_rms_norm_triton"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm(fn, device, dtype):
    x, z, w = _inputs(dtype, device)
    with nan_filled_buffers():
        out = fn(x, z, w, EPS)
    assert out.dtype == dtype
    assert_close(fn.__name__, out, naive_gated_rms_norm(x.cpu(), z.cpu(), w.cpu(), EPS), dtype)
