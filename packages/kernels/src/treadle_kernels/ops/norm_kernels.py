"""Triton RMSNorm kernels (imported lazily: this module imports triton).

One program per row; the whole row sits in registers (``BLOCK >= hidden``), so each element is read once
and written once: the kernel is bound by memory bandwidth. Statistics in fp32. Constexpr flags select the
residual-add variant (``residual_out = round(x + residual)`` stored, then normalised) and Gemma's
``(1 + weight)`` form (no intermediate rounding), matching the native specs in ``treadle_ir.ops.norm``.
In-place calls pass the same pointers for input and output: each program reads its row before writing it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(
    x_ptr,
    x_row_stride,
    residual_ptr,
    residual_row_stride,
    weight_ptr,
    out_ptr,
    out_row_stride,
    residual_out_ptr,
    residual_out_row_stride,
    hidden,
    epsilon,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * residual_out_row_stride + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden
    inv_rms = 1.0 / tl.sqrt(mean_square + epsilon)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        y = x * inv_rms * (1.0 + weight)
    else:
        y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * weight
    tl.store(out_ptr + row * out_row_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
