"""Triton gated-activation kernel (imported lazily: this module imports triton).

Grid (rows, column blocks of the output half). Each program reads ``BLOCK`` gate inputs ``a`` and their
partners ``b`` (``d`` columns further) and writes ``round(round(act(a)) * b)``: the activation in fp32 is
rounded to the input dtype before the multiply, like eager torch on half types. ``tanh`` is built from
``exp`` (``1 - 2 / (exp(2z) + 1)``) on a clamped argument, so nothing overflows. ``SWIGLUOAI`` (gpt-oss):
``(clamp(b, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(a, limit)``, wholly in fp32 and rounded
once, as the IR op's native reference.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def act_and_mul_kernel(
    x_ptr,
    x_row_stride,
    out_ptr,
    out_row_stride,
    d,
    alpha,
    limit,
    GELU_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
    SWIGLUOAI: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    a = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    if SWIGLUOAI:
        g = tl.minimum(a, limit)
        up = tl.minimum(tl.maximum(b, -limit), limit)
        z = tl.maximum(alpha * g, -80.0)  # sigmoid(z < -80) ~ 0 either way; avoids exp overflow
        out = (up + 1.0) * g / (1.0 + tl.exp(-z))
        tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
        return
    if GELU_TANH:
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        z = tl.minimum(tl.maximum(z, -20.0), 20.0)  # tanh(+-20) is +-1 in fp32; avoids exp overflow
        act = 0.5 * a * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:
        act = a / (1.0 + tl.exp(-tl.maximum(a, -80.0)))  # silu(a < -80) ~ 0 either way
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (act * b).to(out_ptr.dtype.element_ty), mask=mask)
