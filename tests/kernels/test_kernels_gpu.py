"""The public ops on CUDA tensors (so the Triton kernels, compiled) at Qwen3.5-like shapes."""

import pytest
import torch
from kernel_asserts import assert_close, cu_seqlens, rel_rms
from qwen35_kernels.attention import paged_attention
from qwen35_kernels.attention.naive import naive_attention
from qwen35_kernels.gdn import (
    chunk_gated_delta_rule,
    chunk_triton,
    fused_recurrent_gated_delta_rule,
    gdn_gating,
)
from qwen35_kernels.gdn.chunk_triton import _chunk_fwd
from qwen35_kernels.gdn.naive import naive_recurrent_gated_delta_rule
from qwen35_kernels.moe import fused_moe, topk_softmax
from qwen35_kernels.moe.naive import naive_moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_gated_delta_rule_cuda(dtype):
    torch.manual_seed(42)
    lens, H, HV, K, V = [1000, 63, 65], 4, 16, 128, 128
    T = sum(lens)
    q, k = (torch.randn(T, H, K, dtype=dtype) for _ in range(2))
    v = torch.randn(T, HV, V, dtype=dtype)
    g, beta = gdn_gating(torch.randn(T, HV), torch.randn(T, HV), torch.rand(HV).log(),
                         torch.randn(HV))  # fmt: skip
    state = torch.randn(4, HV, K, V)
    idx, hi, cu = torch.tensor([3, 0, 1]), torch.tensor([True, False, True]), cu_seqlens(lens)
    st = state.cuda()
    o = chunk_gated_delta_rule(*(x.cuda() for x in (q, k, v, g, beta, cu)), st, idx.cuda(),
                               hi.cuda())  # fmt: skip
    for i, slot in enumerate(idx.tolist()):
        s, e = cu[i].item(), cu[i + 1].item()
        ref_o, ref_h = naive_recurrent_gated_delta_rule(
            q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], state[slot] if hi[i] else None
        )
        assert_close(f"o {i}", o[s:e], ref_o.float(), dtype)
        assert_close(f"state {i}", st[slot], ref_h, dtype)
        if dtype == torch.bfloat16:
            # the kernel's bf16 roundings, emulated on CPU, give 2.5e-3 to 3.5e-3 on the
            # kernel tests' inputs: a bar of 1e-2 leaves room for tf32 and still catches the
            # 2.2e-2 to 2.6e-2 of the racing kernel the H100 and H200 ran
            for name, out, ref in (("o", o[s:e], ref_o), ("state", st[slot], ref_h)):
                err = rel_rms(out, ref)
                assert err <= 1e-2, f"{name} {i}: relative RMS error {err:.2e} > 1e-2"


def _gdn_chunk_stages(lens, H, HV, dtype=torch.bfloat16, runs=3):
    """o, the final states and every intermediate buffer of `runs` identical calls."""
    torch.manual_seed(42)
    T, K = sum(lens), 128
    q, k = (torch.randn(T, H, K, dtype=dtype, device="cuda") for _ in range(2))
    v = torch.randn(T, HV, K, dtype=dtype, device="cuda")
    g, beta = gdn_gating(torch.randn(T, HV), torch.randn(T, HV), torch.rand(HV).log(),
                         torch.randn(HV))  # fmt: skip
    B = len(lens)
    state = torch.randn(B + 1, HV, K, K, device="cuda")
    idx = torch.arange(B, 0, -1, device="cuda")
    hi = (torch.arange(B, device="cuda") % 2) == 0
    out = []
    for _ in range(runs):
        st = state.clone()
        o, stages, _ = _chunk_fwd(
            q, k, v, g.cuda(), beta.cuda(), cu_seqlens(lens).cuda(), st, idx, hi,
            None, True, 64, None, None, None, None,
        )  # fmt: skip
        out.append({**stages, "o": o, "state": st})
    return out


# chunk_triton settings beside the default: fwd_h on four warps (wgmma) as the old kernel ran
# it (BV=32, three stages) and at BV=64, and every launch on mma.sync (two warps)
CHUNK_CONFIGS = {
    "default": {},
    "fwd_h-w4-bv32": {"FWD_H_NUM_WARPS": 4, "FWD_H_BV": 32, "FWD_H_NUM_STAGES": 3},
    "fwd_h-w4-bv64": {"FWD_H_NUM_WARPS": 4, "FWD_H_BV": 64, "FWD_H_NUM_STAGES": 2},
    "all-mma-sync": {"CHUNK_NUM_WARPS": 2},
}


@pytest.mark.parametrize(
    "lens,H,HV", [([1000, 63, 65], 4, 16), ([8192], 16, 64)], ids=["ragged", "397B-8192"]
)
@pytest.mark.parametrize("config", list(CHUNK_CONFIGS))
def test_chunk_gated_delta_rule_cuda_repeatable(monkeypatch, lens, H, HV, config):
    """Identical calls give the same bits, stage by stage. The old single-program kernel gave
    2.2e-2 and 2.6e-2 in two H100 runs and differed between two H200 runs on bf16 inputs,
    though no program of it reads what another program of its launch writes (the interpreter
    test test_chunk_gated_delta_rule_triton_program_order passes for it): a race in the
    compiled tensor-core code, as in Triton's tl.dot recurrence reports (triton-lang/triton
    #9871) for a loop-carried dot state on four warps. The default must repeat; the other
    settings xfail, naming the stages that differ, when they do not, which says whether that
    race is there on this GPU and Triton and in which launch (the first stage listed)."""
    for name, value in CHUNK_CONFIGS[config].items():
        monkeypatch.setattr(chunk_triton, name, value)
    runs = _gdn_chunk_stages(lens, H, HV)
    differ = [
        name for name in runs[0] if not all(torch.equal(runs[0][name], r[name]) for r in runs[1:])
    ]
    if config != "default" and differ:
        pytest.xfail(f"{config} {CHUNK_CONFIGS[config]} is not repeatable: {differ}")
    assert not differ, f"stages that differ between identical runs: {differ}"


def test_fused_recurrent_gated_delta_rule_cuda():
    torch.manual_seed(42)
    B, H, HV, K, V = 32, 16, 64, 128, 128
    q, k = (torch.randn(B, H, K, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, HV, V, dtype=torch.bfloat16)
    g, beta = gdn_gating(torch.randn(B, HV), torch.randn(B, HV), torch.rand(HV).log(),
                         torch.randn(HV))  # fmt: skip
    state = torch.randn(B, HV, K, V)
    idx = torch.randperm(B)
    st = state.cuda()
    o = fused_recurrent_gated_delta_rule(*(x.cuda() for x in (q, k, v, g, beta)), st, idx.cuda())
    st_ref = state.clone()
    ref = fused_recurrent_gated_delta_rule(q, k, v, g, beta, st_ref, idx)
    assert_close("o", o, ref.float(), torch.bfloat16)
    assert_close("state", st, st_ref, torch.bfloat16)


def test_fused_moe_cuda():
    torch.manual_seed(42)
    T, E, top_k, H, I = 64, 512, 10, 256, 128
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    w_gate_up = torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device="cuda") / H**0.5
    w_down = torch.randn(E, H, I, dtype=torch.bfloat16, device="cuda") / I**0.5
    weights, ids = topk_softmax(torch.randn(T, E, device="cuda"), top_k, True)
    out = fused_moe(x, w_gate_up, w_down, weights.bfloat16(), ids)
    ref = naive_moe(x.cpu(), w_gate_up.cpu(), w_down.cpu(), weights.bfloat16().cpu(), ids.cpu())
    assert_close("fused_moe", out, ref, torch.bfloat16)


@pytest.mark.parametrize("q_lens,ctx", [([1] * 8, [3000, 17, 600, 1, 2, 5, 64, 700]),
                                        ([300, 1], [1000, 90])])  # fmt: skip
def test_paged_attention_cuda(q_lens, ctx):
    torch.manual_seed(42)
    HQ, HKV, D, P = 32, 2, 256, 16
    seq = [a + b for a, b in zip(q_lens, ctx)]
    width = max(seq) // P + 1
    tables = torch.randperm(len(seq) * width).view(len(seq), width).int()
    k_cache = torch.randn(len(seq) * width, P, HKV, D, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(q_lens), HQ, D, dtype=torch.bfloat16)
    cu = cu_seqlens(q_lens)
    out = paged_attention(*(t.cuda() for t in (q, k_cache, v_cache, tables, cu, torch.tensor(seq))),
                          D**-0.5, max(q_lens))  # fmt: skip
    for b, L in enumerate(seq):
        pos = torch.arange(L)
        rows = tables[b][pos // P].long() * P + pos % P
        kb = k_cache.view(-1, HKV, D)[rows]
        vb = v_cache.view(-1, HKV, D)[rows]
        ref = naive_attention(q[cu[b] : cu[b + 1]], kb, vb, D**-0.5)
        assert_close(f"sequence {b}", out[cu[b] : cu[b + 1]], ref, torch.bfloat16)
