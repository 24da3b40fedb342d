"""Triton kernels of the fp8 ops (imported lazily: this module imports triton).

``quantize_fp8_rows_kernel``: one program per row: the row's amax, its scale ``amax / 448`` (1 for a zero row), and
its values ``round_e4m3(clamp(x * (1 / scale)))`` stored as float8_e4m3fn; what ``torch._scaled_mm`` then reads. STATIC:
the scale is the given one (a checkpoint's per-tensor input scale), stored for every row, and no amax pass runs.

``fp8_small_m_linear_kernel``: ``out[r, n] = (sum_k q[r, k] * w[n, k]) * s_x[r] * s_w[n] (+ bias[n])`` for a few rows,
where ``q, s_x`` is the row's quantization made on the fly. Grid: one program per BLOCK_N outputs, each streaming its
[BLOCK_N, k] slice of the fp8 weight once (half the bytes of the bf16 kernel in linear_kernels.py, whose layout it
follows); each program first makes one pass over the (few, small, L2-resident) input rows for their amax (STATIC:
the given per-tensor scale instead, no pass).
ROWS 1 reduces with a multiply and a row sum; 16 with ``tl.dot`` on bf16 operands (e4m3 values are exact in bf16, so
the products are exact and the accumulation fp32, as the spec's; UPCAST: fp32 for the CPU interpreter).

Rounding (both kernels): the row's reciprocal ``1 / scale`` is one IEEE round-to-nearest division (``div_rn``, as
torch.reciprocal's) per row, each value a multiply by it (a division per value cost the one-row kernel a third of
its bandwidth, H200 call 2). On the GPU (HW_CVT) the value is then converted by the hardware's round-to-nearest-even
conversion (``cvt.rn.satfinite``); round_e4m3 in fp32 arithmetic did not equal the spec on 28 of 40 H200 cases
(call 3). Under the interpreter, whose fp32 -> fp8 conversion is wrong next to powers of two, ``round_e4m3`` rounds
to e4m3's grid with fp32 arithmetic (adding and subtracting 2^(e + 20) leaves the value rounded to nearest-even at
the e4m3 step 2^(e - 3) of its binade e, at least 2^-9 for the subnormals), so the value is exact before the
conversion.
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn


@triton.jit
def round_e4m3(y):
    """y (fp32, |y| <= 448) rounded to nearest-even on float8_e4m3fn's grid, still fp32."""
    binade = y.to(tl.int32, bitcast=True) & 0x7F800000
    binade = tl.maximum(binade, (127 - 6) << 23)  # below 2^-6 the step stays 2^-9 (subnormals)
    magic = (binade + (20 << 23)).to(tl.float32, bitcast=True)
    mag = tl.abs(y)
    rounded = (mag + magic) - magic
    return tl.where(y < 0, -rounded, rounded)


@triton.jit
def quantize_tile(a, inv_scale, HW_CVT: tl.constexpr):
    """a [R, C] fp32 quantized with its rows' reciprocal scales [R]: e4m3 values, as fp32 (HW_CVT: by the GPU's
    round-to-nearest-even conversion and back; else round_e4m3, as the interpreter's conversion is not exact)."""
    y = tl.minimum(tl.maximum(a * inv_scale[:, None], -FP8_MAX), FP8_MAX)
    if HW_CVT:
        y = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        y = round_e4m3(y)
    return y


@triton.jit
def reciprocal(scale):
    """1 / scale, rounded to nearest (what the spec multiplies the values by)."""
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def scale_of(amax):
    """amax / 448 (rounded to nearest), or 1 where amax is 0."""
    return tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)), 1.0)


@triton.jit
def quantize_fp8_rows_kernel(
    x_ptr,
    x_row_stride,
    q_ptr,
    scale_ptr,
    given_scale_ptr,
    k,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    tile = tl.arange(0, BLOCK_K)
    if STATIC:
        scale = tl.load(given_scale_ptr + tl.arange(0, 1))
    else:
        amax = tl.zeros([1], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tile
            a = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=0))
        scale = scale_of(amax)
    tl.store(scale_ptr + row + tl.arange(0, 1), scale)
    inv_scale = reciprocal(scale)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tile
        a = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
        q = quantize_tile(a[None, :], inv_scale, HW_CVT)
        tl.store(q_ptr + row * k + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=(cols < k)[None, :])


@triton.jit
def fp8_small_m_linear_kernel(
    x_ptr,
    x_row_stride,
    weight_ptr,
    weight_scale_ptr,
    bias_ptr,
    input_scale_ptr,
    out_ptr,
    out_row_stride,
    num_rows,
    n,
    k,
    HAS_BIAS: tl.constexpr,
    STATIC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    rows = tl.arange(0, ROWS)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
    w_rows = weight_ptr + offs_n.to(tl.int64)[:, None] * k
    tile = tl.arange(0, BLOCK_K)

    if STATIC:
        x_scale = tl.load(input_scale_ptr + tl.zeros([ROWS], dtype=tl.int32))
    else:
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tile
            a = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & (cols < k)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        x_scale = scale_of(amax)
    inv_scale = reciprocal(x_scale)

    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tile
        k_mask = cols < k
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        q = quantize_tile(a.to(tl.float32), inv_scale, not UPCAST)
        if ROWS == 1:
            acc += tl.sum(q * w.to(tl.float32), axis=1)[None, :]
        elif UPCAST:  # the CPU interpreter mis-computes 16-bit float dots; fp32 there
            acc = tl.dot(q, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(q.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)

    w_scale = tl.load(weight_scale_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
