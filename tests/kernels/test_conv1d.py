"""Causal conv1d over state slots (prefill and decode update) against the explicit-sum reference."""

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
from qwen35_kernels.conv1d import causal_conv1d_update, causal_conv1d_varlen
from qwen35_kernels.conv1d.causal_conv1d_triton import (
    causal_conv1d_update_triton,
    causal_conv1d_varlen_triton,
)
from qwen35_kernels.conv1d.naive import naive_causal_conv1d

# 2 is shorter than the window, so the new state still holds saved inputs
LENS, C, W, SLOTS = [63, 65, 2, 1], 40, 4, 6


def _inputs(dtype, device):
    torch.manual_seed(42)
    x = {
        "x": torch.randn(sum(LENS), C, dtype=dtype),
        "weight": torch.randn(C, W, dtype=dtype),
        "conv_state": torch.randn(SLOTS, C, W - 1, dtype=dtype),
        "state_indices": torch.tensor([5, 1, 3, 0], dtype=torch.int32),
        "has_initial_state": torch.tensor([True, False, True, False]),
        "cu_seqlens": cu_seqlens(LENS),
        "x1": torch.randn(3, C, dtype=dtype),
        "indices1": torch.tensor([2, 5, 0], dtype=torch.int32),
    }
    return {n: t.to(device) for n, t in x.items()}


def _varlen(fn, dtype, device):
    x = _inputs(dtype, device)
    state = x["conv_state"].clone()
    with nan_filled_buffers():
        out = fn(x["x"], x["weight"], x["cu_seqlens"], state, x["state_indices"],
                 x["has_initial_state"])  # fmt: skip
    x = {n: t.cpu() for n, t in x.items()}
    bounds = x["cu_seqlens"].tolist()
    for i, slot in enumerate(x["state_indices"].tolist()):
        s, e = bounds[i], bounds[i + 1]
        h0 = x["conv_state"][slot] if x["has_initial_state"][i] else None
        ref_y, ref_state = naive_causal_conv1d(x["x"][s:e], x["weight"], h0)
        assert_close(f"output of sequence {i}", out.cpu()[s:e], ref_y, dtype)
        assert_close(f"state of sequence {i}", state.cpu()[slot], ref_state, dtype)
    assert torch.equal(state.cpu()[[2, 4]], x["conv_state"][[2, 4]])


def _update(fn, dtype, device):
    x = _inputs(dtype, device)
    state = x["conv_state"].clone()
    with nan_filled_buffers():
        out = fn(x["x1"], x["weight"], state, x["indices1"])
    x = {n: t.cpu() for n, t in x.items()}
    for i, slot in enumerate(x["indices1"].tolist()):
        ref_y, ref_state = naive_causal_conv1d(
            x["x1"][i : i + 1], x["weight"], x["conv_state"][slot]
        )
        assert_close(f"output of sequence {i}", out.cpu()[i : i + 1], ref_y, dtype)
        assert_close(f"state of sequence {i}", state.cpu()[slot], ref_state, dtype)
    assert torch.equal(state.cpu()[[1, 3, 4]], x["conv_state"][[1, 3, 4]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_varlen(dtype):
    _varlen(causal_conv1d_varlen, dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_varlen_triton(dtype):
    _varlen(causal_conv1d_varlen_triton, dtype, TRITON_DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_update(dtype):
    _update(causal_conv1d_update, dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_update_triton(dtype):
    _update(causal_conv1d_update_triton, dtype, TRITON_DEVICE)
