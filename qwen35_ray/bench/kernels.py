"""Kernel benchmark: every op's fast path against its fp32 reference (and flash-linear-attention).

On CPU the fast path is the vectorised PyTorch code the engine runs there, at the tiny model's
shapes; on a GPU it is the Triton kernel at Qwen3.5-397B's shapes, with the fraction of HBM
bandwidth or of peak FLOP/s it reaches. Run as `qwen35-ray bench kernels --out FILE.json`.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch
from qwen35_kernels.attention import paged_attention
from qwen35_kernels.attention.naive import naive_attention
from qwen35_kernels.conv1d import causal_conv1d_update, causal_conv1d_varlen
from qwen35_kernels.conv1d.naive import naive_causal_conv1d
from qwen35_kernels.gdn import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, gdn_gating
from qwen35_kernels.gdn.naive import naive_recurrent_gated_delta_rule
from qwen35_kernels.moe import fused_moe, topk_softmax
from qwen35_kernels.moe.naive import naive_moe
from qwen35_kernels.norm import gated_rms_norm, rms_norm
from qwen35_kernels.norm.naive import naive_gated_rms_norm, naive_rms_norm

from qwen35_ray.bench.timing import machine_info, time_call

# tiny model (CPU) and Qwen3.5-397B-A17B (GPU): GDN heads H/HV and dims K=V, conv width W, MoE
# experts E / top-k / hidden / expert width I, attention heads Hq/Hkv, head dim D, page P
SHAPES = {
    "cpu": dict(H=2, HV=4, K=32, W=4, E=16, top_k=4, hidden=128, I=64, Hq=4, Hkv=2, D=64, P=16),
    "cuda": dict(H=16, HV=64, K=128, W=4, E=512, top_k=10, hidden=4096, I=1024, Hq=32, Hkv=2,
                 D=256, P=16),
}  # fmt: skip


def _gdn_inputs(s, lead, dtype, device):
    q, k = (torch.randn(*lead, s["H"], s["K"], dtype=dtype, device=device) for _ in range(2))
    v = torch.randn(*lead, s["HV"], s["K"], dtype=dtype, device=device)
    a, b = (torch.randn(*lead, s["HV"], device=device) for _ in range(2))
    A_log, dt_bias = torch.rand(s["HV"], device=device).log(), torch.zeros(s["HV"], device=device)
    return (q, k, v, *gdn_gating(a, b, A_log, dt_bias))


def _fla():
    if os.environ.get("QWEN35_BENCH_NO_FLA"):
        return None
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except ImportError:
        return None
    return fla_chunk, fla_recurrent


def _with_chunk_settings(settings, fn):
    """fn run with the chunk kernel module's settings (e.g. FWD_H_NUM_WARPS) replaced."""
    from qwen35_kernels.gdn import chunk_triton

    def call():
        saved = {name: getattr(chunk_triton, name) for name in settings}
        for name, value in settings.items():
            setattr(chunk_triton, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(chunk_triton, name, value)

    return call


def _gdn_prefill(s, device, dtype, T):
    q, k, v, g, beta = _gdn_inputs(s, (T,), dtype, device)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    state = torch.zeros(1, s["HV"], s["K"], s["K"], device=device)
    idx = torch.zeros(1, dtype=torch.int32, device=device)
    fresh = torch.zeros(1, dtype=torch.bool, device=device)
    fast = lambda: chunk_gated_delta_rule(q, k, v, g, beta, cu, state, idx, fresh)
    # the token loop takes minutes at 397B shapes beyond 4096 tokens; skipped there
    ref = (lambda: naive_recurrent_gated_delta_rule(q, k, v, g, beta)) if T <= 4096 else None
    others = {}
    if device == "cuda":
        # in the JSON only, the same call with the recurrence on four warps (wgmma) instead of
        # two (mma.sync), and with every launch on mma.sync: speedup_vs_<name> above 1 when
        # the default is faster
        w4 = {"FWD_H_NUM_WARPS": 4, "FWD_H_BV": 32, "FWD_H_NUM_STAGES": 3}
        others["fwd_h_w4_bv32"] = _with_chunk_settings(w4, fast)
        others["all_mma_sync"] = _with_chunk_settings({"CHUNK_NUM_WARPS": 2}, fast)
    fla = _fla() if device == "cuda" else None
    if fla:
        # flash-linear-attention gets q and k repeated to the value heads
        G = s["HV"] // s["H"]
        qr, kr = (x.repeat_interleave(G, 1)[None] for x in (q, k))
        others["fla"] = lambda: fla[0](
            qr, kr, v[None], g[None], beta[None], use_qk_l2norm_in_kernel=True
        )
    BT, K, HV = 64, s["K"], s["HV"]
    # model FLOPs of the chunked form: K x V state products plus the BT-wide in-chunk ones
    flops = 2 * T * HV * (3 * K * K + BT * 5 * K)
    return f"gdn chunk prefill T={T}", fast, ref, others, {"flops": flops}


def _gdn_decode(s, device, dtype, B):
    q, k, v, g, beta = _gdn_inputs(s, (B,), dtype, device)
    state = torch.randn(B, s["HV"], s["K"], s["K"], device=device)
    idx = torch.arange(B, device=device)
    fast = lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta, state, idx)

    def ref():
        for i in range(B):
            one = (x[i : i + 1] for x in (q, k, v, g, beta))
            naive_recurrent_gated_delta_rule(*one, initial_state=state[i])

    others = {}
    fla = _fla() if device == "cuda" else None
    if fla:
        G = s["HV"] // s["H"]
        qr, kr = (x.repeat_interleave(G, 1)[:, None] for x in (q, k))
        others["fla"] = lambda: fla[1](
            qr, kr, v[:, None], g[:, None], beta[:, None], initial_state=state,
            output_final_state=True, use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
    # the fp32 state is read and written once per step; it dwarfs the token's q, k, v
    return f"gdn recurrent decode B={B}", fast, ref, others, {"bytes": state.numel() * 8}


def _gdn_prefill_launches(s, device, dtype, T):
    """One row per launch of the Triton chunk kernels, each rerun alone on buffers one full
    call filled: where the prefill's time goes."""
    from qwen35_kernels.gdn.chunk_triton import _chunk_fwd

    q, k, v, g, beta = _gdn_inputs(s, (T,), dtype, device)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    state = torch.zeros(1, s["HV"], s["K"], s["K"], device=device)
    idx = torch.zeros(1, dtype=torch.int32, device=device)
    fresh = torch.zeros(1, dtype=torch.bool, device=device)
    launches = _chunk_fwd(
        q, k, v, g, beta, cu, state, idx, fresh, None, True, 64, None, None, None, None
    )[2]
    for name, run in launches:
        yield f"gdn chunk prefill T={T} launch {name}", run, None, {}, {}


def gdn_cases(s, device, dtype, quick):
    prefill = [4096] if device == "cpu" else ([2048, 8192] if quick else [2048, 8192, 32768])
    decode = [32] if device == "cpu" else ([1, 32] if quick else [1, 32, 256])
    yield from (_gdn_prefill(s, device, dtype, T) for T in prefill)
    if device == "cuda":
        yield from _gdn_prefill_launches(s, device, dtype, 8192)
    yield from (_gdn_decode(s, device, dtype, B) for B in decode)


def conv_cases(s, device, dtype, quick):
    C, W = 2 * s["H"] * s["K"] + s["HV"] * s["K"], s["W"]
    T = 4096 if device == "cpu" else 8192
    x = torch.randn(T, C, dtype=dtype, device=device)
    w = torch.randn(C, W, dtype=dtype, device=device)
    cs = torch.zeros(1, C, W - 1, dtype=dtype, device=device)
    i0 = torch.zeros(1, dtype=torch.int32, device=device)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    fresh = torch.zeros(1, dtype=torch.bool, device=device)
    fast = lambda: causal_conv1d_varlen(x, w, cu, cs, i0, fresh)
    ref = lambda: naive_causal_conv1d(x, w)
    yield f"conv1d varlen T={T} C={C}", fast, ref, {}, {"bytes": 2 * x.numel() * x.element_size()}
    B = 256
    xb, csb = x[:B].contiguous(), torch.zeros(B, C, W - 1, dtype=dtype, device=device)
    idx = torch.arange(B, device=device)
    fast = lambda: causal_conv1d_update(xb, w, csb, idx)
    ref = lambda: [naive_causal_conv1d(xb[i : i + 1], w, csb[i]) for i in range(B)]
    nbytes = 2 * csb.numel() * csb.element_size()
    yield f"conv1d update B={B} C={C}", fast, ref, {}, {"bytes": nbytes}


def norm_cases(s, device, dtype, quick):
    T, N = 4096, s["hidden"]
    x = torch.randn(T, N, dtype=dtype, device=device)
    w = torch.randn(N, dtype=dtype, device=device)
    fast, ref = lambda: rms_norm(x, w, 1e-6), lambda: naive_rms_norm(x, w, 1e-6)
    yield f"rms_norm [{T}, {N}]", fast, ref, {}, {"bytes": 2 * x.numel() * x.element_size()}
    xg = torch.randn(T, s["HV"], s["K"], dtype=dtype, device=device)
    z, wg = torch.randn_like(xg), torch.randn(s["K"], dtype=dtype, device=device)
    fast = lambda: gated_rms_norm(xg, z, wg, 1e-6)
    ref = lambda: naive_gated_rms_norm(xg, z, wg, 1e-6)
    nbytes = 3 * xg.numel() * xg.element_size()
    yield f"gated_rms_norm [{T}, {s['HV']}, {s['K']}]", fast, ref, {}, {"bytes": nbytes}


def _moe(s, device, dtype, T, w_gate_up, w_down):
    E, k, Hd, I = s["E"], s["top_k"], s["hidden"], s["I"]
    x = torch.randn(T, Hd, dtype=dtype, device=device)
    weights, ids = topk_softmax(torch.randn(T, E, device=device), k, True)
    weights = weights.to(dtype)
    fast = lambda: fused_moe(x, w_gate_up, w_down, weights, ids)
    ref = (lambda: naive_moe(x, w_gate_up, w_down, weights, ids)) if T * k <= 8192 else None
    # decode reads every touched expert's weights once; prefill is bound by the GEMMs
    touched = int(ids.unique().numel())
    extra = {"flops": 6 * T * k * Hd * I, "bytes": touched * 3 * Hd * I * x.element_size()}
    return f"fused_moe T={T} E={E} top{k}", fast, ref, {}, extra


def moe_cases(s, device, dtype, quick):
    E, Hd, I = s["E"], s["hidden"], s["I"]
    w_gate_up = torch.randn(E, 2 * I, Hd, dtype=dtype, device=device) / Hd**0.5
    w_down = torch.randn(E, Hd, I, dtype=dtype, device=device) / I**0.5
    sizes = [1, 512] if device == "cpu" else ([1, 32, 2048] if quick else [1, 32, 256, 8192])
    yield from (_moe(s, device, dtype, T, w_gate_up, w_down) for T in sizes)
    logits = torch.randn(4096, E, device=device)
    fast = lambda: topk_softmax(logits, s["top_k"], True)
    yield f"topk_softmax T=4096 E={E}", fast, None, {}, {"bytes": logits.numel() * 4}


def _attention(s, device, dtype, B, L, Lq):
    Hq, Hkv, D, P = s["Hq"], s["Hkv"], s["D"], s["P"]
    scale, M = D**-0.5, (L + P - 1) // P
    kc = torch.randn(B * M, P, Hkv, D, dtype=dtype, device=device)
    vc = torch.randn_like(kc)
    tables = torch.arange(B * M, device=device, dtype=torch.int32).view(B, M)
    q = torch.randn(B * Lq, Hq, D, dtype=dtype, device=device)
    cu = torch.arange(0, B * Lq + 1, Lq, device=device, dtype=torch.int32)
    lens = torch.full((B,), L, device=device, dtype=torch.int32)
    fast = lambda: paged_attention(q, kc, vc, tables, cu, lens, scale, Lq)
    kf, vf = kc.view(B, M * P, Hkv, D)[:, :L], vc.view(B, M * P, Hkv, D)[:, :L]
    ref = lambda: [naive_attention(q[b * Lq : (b + 1) * Lq], kf[b], vf[b], scale) for b in range(B)]
    name = "decode" if Lq == 1 else ("prefill" if Lq == L else "chunked prefill")
    extra = {"bytes": 2 * kc.numel() * kc.element_size(), "flops": 4 * B * Hq * D * Lq * L}
    return f"paged attention {name} B={B} L={L} Lq={Lq}", fast, ref, {}, extra


def attention_cases(s, device, dtype, quick):
    for B, L, Lq in [(32, 1024, 1), (1, 2048, 2048), (2, 2048, 512)]:
        yield _attention(s, device, dtype, B, L, Lq)


GROUPS = [gdn_cases, conv_cases, norm_cases, moe_cases, attention_cases]


def _row(name, fast, ref, others, extra, device, peak):
    row = {"op": name}
    row["fast_s"] = time_call(fast, device)
    if ref is not None:
        row["reference_s"] = time_call(ref, device, min_time=0.0, max_reps=3)
        row["speedup_vs_reference"] = row["reference_s"] / row["fast_s"]
    for other, fn in others.items():
        row[f"{other}_s"] = time_call(fn, device)
        row[f"speedup_vs_{other}"] = row[f"{other}_s"] / row["fast_s"]
    if "bytes" in extra:
        row["bytes"] = extra["bytes"]
        if peak:
            row["hbm_fraction"] = extra["bytes"] / row["fast_s"] / peak["hbm_bytes_per_s"]
    if "flops" in extra:
        row["flops"] = extra["flops"]
        if peak:
            row["peak_flops_fraction"] = extra["flops"] / row["fast_s"] / peak["flops_bf16"]
    return row


def run_kernel_bench(
    device: str, quick: bool, progress: Callable[[str], None] | None = None, groups=None
):
    """Times every op on `device` ("cpu" or "cuda"), or those of `groups` (of GROUPS); returns
    {"machine": ..., "results": [...]}."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    torch.manual_seed(42)
    info = machine_info(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    results = []
    for group in groups or GROUPS:
        for name, fast, ref, others, extra in group(SHAPES[device], device, dtype, quick):
            progress(f"[bench kernels] {name} ...")
            try:
                results.append(_row(name, fast, ref, others, extra, device, info.get("peak")))
            except Exception as e:  # one failing op must not lose the others' numbers
                results.append({"op": name, "error": f"{type(e).__name__}: {e}"})
            progress(f"[bench kernels] {name}: {format_row(results[-1])}")
    return {"machine": info, "quick": quick, "dtype": str(dtype), "results": results}


def format_row(row: dict) -> str:
    if "error" in row:
        return f"error {row['error']}"
    parts = [f"{row['fast_s'] * 1e3:9.3f} ms"]
    if "speedup_vs_reference" in row:
        parts.append(
            f"reference {row['reference_s'] * 1e3:9.1f} ms ({row['speedup_vs_reference']:.1f}x)"
        )
    if "speedup_vs_fla" in row:
        parts.append(f"fla {row['fla_s'] * 1e3:.3f} ms ({row['speedup_vs_fla']:.2f}x)")
    for key, label in (("hbm_fraction", "HBM"), ("peak_flops_fraction", "peak FLOP/s")):
        if key in row:
            parts.append(f"{label} {row[key]:.0%}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen35-ray bench kernels", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU is visible, else cpu")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_kernel_bench(device, args.quick)
    m = result["machine"]
    print(f"{m['device_name']} | torch {m['torch']} | triton {m['triton']} | {result['dtype']}")
    width = max(len(r["op"]) for r in result["results"])
    for row in result["results"]:
        print(f"{row['op']:<{width}}  {format_row(row)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
