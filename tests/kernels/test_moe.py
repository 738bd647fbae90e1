"""Top-k softmax routing and the fused expert MLP at Qwen3.5's 512 experts, top-10."""

import pytest
import torch
from kernel_asserts import DTYPES, TRITON_DEVICE, assert_close, nan_filled_buffers, needs_triton
from qwen35_kernels.moe import (
    fused_moe,
    fused_moe_triton,
    gathers_experts,
    moe_align_block_size,
    topk_softmax,
    topk_softmax_triton,
)
from qwen35_kernels.moe.naive import naive_moe, naive_topk_softmax

# 7 tokens x 10 choices over 512 experts: most experts receive no token
T, E, TOP_K, H, I = 7, 512, 10, 32, 16


def _inputs(dtype, device):
    torch.manual_seed(42)
    x = {
        "logits": torch.randn(T, E),
        "x": torch.randn(T, H, dtype=dtype),
        "w_gate_up": (torch.randn(E, 2 * I, H) / H**0.5).to(dtype),
        "w_down": (torch.randn(E, H, I) / I**0.5).to(dtype),
    }
    return {n: t.to(device) for n, t in x.items()}


@pytest.mark.parametrize(
    "fn,device",
    [(topk_softmax, "cpu"), pytest.param(topk_softmax_triton, TRITON_DEVICE, marks=needs_triton)],
    ids=["topk_softmax", "topk_softmax_triton"],
)
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax(fn, device, renormalize):
    logits = _inputs(torch.float32, device)["logits"]
    with nan_filled_buffers():
        weights, ids = fn(logits, TOP_K, renormalize)
    ref_w, ref_ids = naive_topk_softmax(logits.cpu(), TOP_K, renormalize)
    assert torch.equal(ids.cpu(), ref_ids), "chosen experts differ from the reference"
    assert_close(fn.__name__, weights, ref_w, torch.float32)


def test_moe_align_block_size():
    ids = torch.tensor([[3, 0], [3, 5], [0, 3]])
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 4, 8)
    n = int(num_padded)
    assert n == 12  # experts 0, 3 and 5 each own one 4-row block
    assert expert_ids[:3].tolist() == [0, 3, 5] and (expert_ids[3:] == -1).all()
    blocks = sorted_ids[:n].view(3, 4).tolist()
    assert blocks == [[1, 4, 6, 6], [0, 2, 5, 6], [3, 6, 6, 6]]  # 6 = T * k marks padding


@pytest.mark.parametrize(
    "fn,device",
    [(fused_moe, "cpu"), pytest.param(fused_moe_triton, TRITON_DEVICE, marks=needs_triton)],
    ids=["fused_moe", "fused_moe_triton"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe(fn, device, dtype):
    x = _inputs(dtype, device)
    weights, ids = topk_softmax(x["logits"], TOP_K, True)
    with nan_filled_buffers():
        out = fn(x["x"], x["w_gate_up"], x["w_down"], weights.to(dtype), ids)
    assert out.dtype == dtype
    ref = naive_moe(*(x[n].cpu() for n in ("x", "w_gate_up", "w_down")),
                    weights.cpu().to(dtype), ids.cpu())  # fmt: skip
    assert_close(fn.__name__, out, ref, dtype)


@needs_triton
def test_fused_moe_triton_large_blocks():
    """64-row blocks: one expert's copies share a block, most rows are padding."""
    x = _inputs(torch.float32, TRITON_DEVICE)
    weights, ids = topk_softmax(x["logits"], TOP_K, True)
    with nan_filled_buffers():
        out = fused_moe_triton(x["x"], x["w_gate_up"], x["w_down"], weights, ids,
                               block_m=64, block_n=32, block_k=16)  # fmt: skip
    ref = naive_moe(*(x[n].cpu() for n in ("x", "w_gate_up", "w_down")), weights.cpu(), ids.cpu())
    assert_close("fused_moe_triton", out, ref, torch.float32)


@pytest.mark.parametrize(
    ("tokens", "E", "k", "gathered"),
    [(2, 32, 2, True), (1, 16, 4, False), (16, 16, 4, False), (100, 16, 4, False)],
    ids=["gathered", "dense-1", "dense-16", "per-expert"],
)
@pytest.mark.parametrize("layout", ["row_major", "column_major"])
def test_fused_moe_cpu_paths(tokens, E, k, gathered, layout):
    """Each eager CPU path (qwen35-tiny's 16 experts, top 4, but for the gathered one, which
    needs more experts) against the reference, with the experts contiguous, as the CPU loader
    keeps them, or each expert's matrix column-major."""
    assert gathers_experts(tokens, k, E) == gathered
    torch.manual_seed(42)
    H, I = 32, 16
    x = torch.randn(tokens, H)
    w_gate_up, w_down = torch.randn(E, 2 * I, H) / H**0.5, torch.randn(E, H, I) / I**0.5
    if layout == "column_major":
        w_gate_up, w_down = w_gate_up.mT.contiguous().mT, w_down.mT.contiguous().mT
    weights, ids = topk_softmax(torch.randn(tokens, E), k, True)
    with nan_filled_buffers():
        out = fused_moe(x, w_gate_up, w_down, weights, ids)
    assert_close("fused_moe", out, naive_moe(x, w_gate_up, w_down, weights, ids), torch.float32)


def test_fused_moe_compiled_gathers_more_pairs():
    """Under torch.compile the gather fuses into the products, so 16 tokens x top 4 of 16
    experts (64 pairs) run gathered there and densely in eager; both match the reference."""
    assert gathers_experts(16, 4, 16, compiled=True) and not gathers_experts(16, 4, 16)
    torch.manual_seed(42)
    x, w_gate_up, w_down = torch.randn(16, 32), torch.randn(16, 32, 32), torch.randn(16, 32, 16)
    weights, ids = topk_softmax(torch.randn(16, 16), 4, True)
    compiled = torch.compile(fused_moe, fullgraph=True)
    ref = naive_moe(x, w_gate_up, w_down, weights, ids)
    assert_close("compiled", compiled(x, w_gate_up, w_down, weights, ids), ref, torch.float32)
