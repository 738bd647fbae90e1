"""Triton RMSNorms: one program per row, the whole row in registers (N <= 64K).

Rounding follows rms_norm.py: the zero-centred norm scales in fp32 before its one cast; the gated
norm casts the normalised row to the input dtype, scales by w, then gates in fp32.
"""

import torch
import triton
import triton.language as tl
from qwen35_kernels.utils import next_pow2


@triton.jit
def rms_norm_fwd_kernel(x, z, weight, out, eps, N: tl.constexpr, BN: tl.constexpr,
                        GATED: tl.constexpr):  # fmt: skip
    i_r = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    b_x = tl.load(x + i_r * N + o_n, mask=m_n, other=0).to(tl.float32)
    b_w = tl.load(weight + o_n, mask=m_n, other=0).to(tl.float32)
    b_x = b_x * tl.rsqrt(tl.sum(b_x * b_x) / N + eps)
    if GATED:
        b_z = tl.load(z + i_r * N + o_n, mask=m_n, other=0).to(tl.float32)
        b_h = (b_x.to(x.dtype.element_ty).to(tl.float32) * b_w).to(x.dtype.element_ty)
        b_y = b_h.to(tl.float32) * b_z * tl.sigmoid(b_z)
    else:
        b_y = b_x * (1.0 + b_w)
    tl.store(out + i_r * N + o_n, b_y.to(out.dtype.element_ty), mask=m_n)


def _launch(x, z, weight, eps):
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    z2 = None if z is None else z.reshape(-1, N).contiguous()
    out = torch.empty_like(x2)
    if x2.shape[0]:
        rms_norm_fwd_kernel[(x2.shape[0],)](
            x2, z2, weight.contiguous(), out, eps, N=N, BN=next_pow2(N), GATED=z is not None
        )
    return out.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm over the last axis: x / rms(x) * (1 + w), in x's dtype."""
    return _launch(x, None, weight, eps)


def gated_rms_norm_triton(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gated RMSNorm over the last axis: x / rms(x) * w * silu(z), in x's dtype."""
    return _launch(x, z, weight, eps)
