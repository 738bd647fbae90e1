"""Triton helpers shared by the kernels."""

import os

import triton
import triton.language as tl

# Read when the kernels are defined, as Triton itself does: the interpreter needs the flag set
# before the kernel modules are imported.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot, but exact under the CPU interpreter.

    The interpreter (Triton 3.9) multiplies bf16 operands as their raw uint16 bits, so there they
    are widened to fp32 first; on a GPU the operands go to the tensor cores as they are.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PRECISION)
