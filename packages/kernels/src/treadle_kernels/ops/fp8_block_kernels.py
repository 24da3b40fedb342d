"""Triton kernels of the block-wise fp8 ops (imported lazily: this module imports triton).

``quantize_fp8_groups_kernel``: one program per (row, GROUPS groups): each group's amax, its scale ``amax / 448`` (1
for a zero group) and its values, stored as float8_e4m3fn next to an fp32 scale per group (row-major [rows, groups]).

``fp8_block_gemv_kernel`` (one row, a decode step): one program per BLOCK_N outputs streams its [BLOCK_N, k] slice of
the fp8 weight once, GROUPS K blocks a step as a [BLOCK_N, GROUPS, block_k] tile, quantizing the row's groups on the
fly; each K block's products are summed (multiply and reduce, no tensor cores) and that partial sum scaled by the
group's scale and the weight tile's scale before it joins the fp32 accumulator.

``fp8_block_gemm_kernel`` (more rows): a [BLOCK_M, BLOCK_N] output tile per program, one K block (BLOCK_K = block_k,
padded to a power of two) a step: ``tl.dot`` of the e4m3 activations and weight tile into a fresh fp32 partial sum,
scaled by the rows' group scales [BLOCK_M] and the weight tiles' scales [BLOCK_N] (a gather: BLOCK_N need not match
block_n), added to the accumulator. The partial sum spans one K block, so Hopper's reduced-precision fp8 accumulation
never runs longer than block_k products. QUANT_A: the activations are quantized in the kernel from the model-dtype
rows (the tile of a K step is exactly one group per row, so the group amax needs no extra pass; one launch, for
small batches); otherwise they come quantized from ``quantize_fp8_groups_kernel``. Program ids are grouped GROUP_M
row tiles at a time, so a weight tile is read by neighbouring programs while it is in L2. EXACT_K (block_k is a power
of two dividing k): no K mask.

Rounding: the spec's (treadle_ir.ops.fp8_block), with the helpers of fp8_linear_kernels.py: the reciprocal of the
scale by one IEEE division, a multiply per value, the hardware's round-to-nearest-even conversion on the GPU
(HW_CVT) and ``round_e4m3`` under the interpreter, whose own conversion is not exact. UPCAST (the interpreter, which
has no fp8 dot and mis-computes 16-bit ones): fp32 operands with ``input_precision="ieee"``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fp8_linear_kernels import FP8_MAX, quantize_tile, reciprocal, round_e4m3, scale_of


@triton.jit
def quantize_fp8_groups_kernel(
    x_ptr,
    x_row_stride,
    q_ptr,
    scale_ptr,
    k,
    group_size,
    num_groups,
    GROUPS: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, GROUP_PAD)
    cols = groups[:, None] * group_size + lane[None, :]
    mask = (lane < group_size)[None, :] & (cols < k)
    a = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = scale_of(tl.max(tl.abs(a), axis=1))
    q = quantize_tile(a, reciprocal(scale), HW_CVT)
    tl.store(q_ptr + row * k + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * num_groups + groups, scale, mask=groups < num_groups)


@triton.jit
def fp8_block_gemv_kernel(
    x_ptr,
    weight_ptr,
    weight_scale_ptr,
    bias_ptr,
    out_ptr,
    n,
    k,
    block_n,
    block_k,
    num_kb,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    w_rows = weight_ptr + offs_n.to(tl.int64)[:, None, None] * k  # [BLOCK_N, 1, 1]
    w_scale_rows = weight_scale_ptr + (offs_n // block_n)[:, None] * num_kb  # [BLOCK_N, 1]
    lane = tl.arange(0, GROUP_PAD)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, num_kb, GROUPS):
        groups = g0 + tl.arange(0, GROUPS)
        cols = groups[:, None] * block_k + lane[None, :]  # [GROUPS, GROUP_PAD]
        mask = (lane < block_k)[None, :] & (cols < k)
        a = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x_scale = scale_of(tl.max(tl.abs(a), axis=1))  # [GROUPS]
        q = quantize_tile(a, reciprocal(x_scale), HW_CVT)
        w = tl.load(w_rows + cols[None, :, :], mask=n_mask[:, None, None] & mask[None, :, :], other=0.0)
        partial = tl.sum(w.to(tl.float32) * q[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
        scale_mask = n_mask[:, None] & (groups < num_kb)[None, :]
        w_scale = tl.load(w_scale_rows + groups[None, :], mask=scale_mask, other=0.0)
        acc += tl.sum(partial * w_scale * x_scale[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def fp8_block_gemm_kernel(
    a_ptr,
    a_row_stride,
    a_scale_ptr,
    weight_ptr,
    weight_scale_ptr,
    bias_ptr,
    out_ptr,
    out_row_stride,
    m,
    n,
    k,
    block_n,
    block_k,
    num_kb,
    QUANT_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EXACT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HW_CVT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(m, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(n, BLOCK_N)
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < m
    n_mask = offs_n < n
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * a_row_stride
    w_rows = weight_ptr + offs_n.to(tl.int64)[:, None] * k
    w_scale_rows = weight_scale_ptr + (offs_n // block_n) * num_kb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, num_kb):
        if EXACT_K:  # block_k == BLOCK_K: the compiler sees contiguous, aligned K tiles
            cols = kb * BLOCK_K + offs_k
            a_mask = m_mask[:, None]
            w_mask = n_mask[:, None]
        else:
            cols = kb * block_k + offs_k
            k_mask = (offs_k < block_k) & (cols < k)
            a_mask = m_mask[:, None] & k_mask[None, :]
            w_mask = n_mask[:, None] & k_mask[None, :]
        a = tl.load(a_rows + cols[None, :], mask=a_mask, other=0.0)
        if QUANT_A:
            a = a.to(tl.float32)
            a_scale = scale_of(tl.max(tl.abs(a), axis=1))
            y = tl.minimum(tl.maximum(a * reciprocal(a_scale)[:, None], -FP8_MAX), FP8_MAX)
            if UPCAST:
                a = round_e4m3(y)
            else:
                a = y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
        else:
            a_scale = tl.load(a_scale_ptr + offs_m * num_kb + kb, mask=m_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0)
        if UPCAST:
            partial = tl.dot(a, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            partial = tl.dot(a, tl.trans(w))
        w_scale = tl.load(w_scale_rows + kb, mask=n_mask, other=0.0)
        acc += partial * a_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
