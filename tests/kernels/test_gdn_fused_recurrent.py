"""Recurrent gated delta rule (decode, speculative verification) against the fp32 recurrence."""

import pytest
import torch
from kernel_asserts import DTYPES, TRITON_DEVICE, assert_close, nan_filled_buffers, needs_triton
from qwen35_kernels.gdn import (
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_triton,
    fused_recurrent_gated_delta_rule_with_gating,
    gdn_gating,
)
from qwen35_kernels.gdn.naive import naive_recurrent_gated_delta_rule

B, H, HV, K, V, SLOTS = 3, 2, 4, 16, 32, 5


def _inputs(T, dtype, device):
    """T tokens per sequence; T = 0 means plain decode with [B, H, K] inputs."""
    torch.manual_seed(42)
    lead = (B,) if T == 0 else (B, T)
    x = {
        "q": torch.randn(*lead, H, K, dtype=dtype),
        "k": torch.randn(*lead, H, K, dtype=dtype),
        "v": torch.randn(*lead, HV, V, dtype=dtype),
        "a": torch.randn(*lead, HV, dtype=dtype),
        "b": torch.randn(*lead, HV, dtype=dtype),
        "A_log": torch.rand(HV).log(),
        "dt_bias": torch.randn(HV),
        "state": torch.randn(SLOTS, HV, K, V),
        "state_indices": torch.tensor([3, 0, 4], dtype=torch.int32),
    }
    x["g"], x["beta"] = gdn_gating(x["a"], x["b"], x["A_log"], x["dt_bias"])
    return {n: t.to(device) for n, t in x.items()}


def _check(x, o, state, inter, dtype):
    x = {n: t.cpu() for n, t in x.items()}
    one_token = x["q"].dim() == 3
    for i, slot in enumerate(x["state_indices"].tolist()):
        seq = [x[n][i : i + 1] if one_token else x[n][i] for n in ("q", "k", "v", "g", "beta")]
        ref_o, ref_h, ref_inter = naive_recurrent_gated_delta_rule(
            *seq, x["state"][slot], output_intermediate_states=True
        )
        assert_close(f"o of sequence {i}", o.cpu()[i], ref_o[0] if one_token else ref_o, dtype)
        assert_close(f"state of sequence {i}", state.cpu()[slot], ref_h, dtype)
        if inter is not None:
            assert_close(f"intermediate states of sequence {i}", inter.cpu()[i], ref_inter, dtype)
    untouched = sorted(set(range(SLOTS)) - set(x["state_indices"].tolist()))
    assert torch.equal(state.cpu()[untouched], x["state"][untouched])


def _run(fn, x, T, gating):
    state = x["state"].clone()
    inter = None
    if T:
        inter = torch.full((B, T, HV, K, V), float("nan"), device=state.device)
    gates = [x[n] for n in (("a", "b", "A_log", "dt_bias") if gating else ("g", "beta"))]
    with nan_filled_buffers():
        if fn is fused_recurrent_gated_delta_rule_triton and gating:
            a, b, A_log, dt_bias = gates
            o = fn(
                x["q"], x["k"], x["v"], None, None, state, x["state_indices"],
                intermediate_states=inter, a=a, b=b, A_log=A_log, dt_bias=dt_bias,
            )  # fmt: skip
        else:
            o = fn(x["q"], x["k"], x["v"], *gates, state, x["state_indices"],
                   intermediate_states=inter)  # fmt: skip
    return o, state, inter


@pytest.mark.parametrize("T", [0, 3], ids=["decode", "spec3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_recurrent_gated_delta_rule(T, dtype):
    x = _inputs(T, dtype, "cpu")
    _check(x, *_run(fused_recurrent_gated_delta_rule, x, T, gating=False), dtype)


@needs_triton
@pytest.mark.parametrize("T", [0, 3], ids=["decode", "spec3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_recurrent_gated_delta_rule_triton(T, dtype):
    x = _inputs(T, dtype, TRITON_DEVICE)
    _check(x, *_run(fused_recurrent_gated_delta_rule_triton, x, T, gating=False), dtype)


def test_fused_recurrent_gated_delta_rule_with_gating():
    x = _inputs(2, torch.float32, "cpu")
    o = _run(fused_recurrent_gated_delta_rule_with_gating, x, 2, gating=True)
    _check(x, *o, torch.float32)


@needs_triton
@pytest.mark.parametrize("T", [0, 2], ids=["decode", "spec2"])
def test_fused_recurrent_gated_delta_rule_triton_with_gating(T):
    x = _inputs(T, torch.float32, TRITON_DEVICE)
    _check(x, *_run(fused_recurrent_gated_delta_rule_triton, x, T, gating=True), torch.float32)
