"""Triton small-batch linear kernel with a fused prologue (imported lazily: this module imports triton).

``out[r, n] = sum_k a[r, k] * weight[n, k] (+ bias[n])`` for a few rows r, where ``a`` is the prologue applied to
the input on the fly:
    PROLOGUE 0: a = x
    PROLOGUE 1: a = rms_norm(x + residual) (the sum rounded, then normalised and rounded, as fused_add_rms_norm)
    PROLOGUE 2: a = round(round(silu(x[:, :k])) * x[:, k:])      PROLOGUE 3: the same with gelu_tanh
Grid: one program per BLOCK_N output columns, each streaming its [BLOCK_N, k] slice of the weight once; with a
handful of rows the kernel is bound by that read, so there is no split-K and no second reduction launch.
ROWS is the padded row count: 1 reduces with an elementwise multiply and a row sum; 16 uses tl.dot (UPCAST:
in fp32, for the CPU interpreter, which mis-computes 16-bit dots).
PROLOGUE 1 first makes one pass over the (few, small) input rows for their mean square; program 0 also stores
``x + residual`` to ``residual_out``. Accumulation is fp32.
USE_PDL (programmatic dependent launch, Hopper; opt-in): the kernel may start while the kernel before it finishes;
it requests its first weight tile (independent of that kernel), lets the next kernel launch, and waits
(``gdc_wait``) before reading any input. Every PDL kernel waits before it ends, so completion stays transitive.
Measured on an H200 (results/gpu-latency-h200-6d5783c): faster alone for qkv, o and down, slower for gate_up and
lm_head, and batch-1 decode 0.09-0.14 ms per token slower end to end; off by default. Against today's register-capped
configs (which PDL launches leave uncapped: the held tile needs 126-192 registers) 5.01 against 4.14 ms per token
(results/gpu-pdl-cap-h200-381f3dc, call 2). Without PDL the weight is
read in the loop: requesting the first tile ahead of the loop made down + SiLU 35.9 us against 31.3, and holding
the next tile through the loop doubled the registers a program needs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gated(a, b, GELU_TANH: tl.constexpr, dtype: tl.constexpr):
    """round(round(act(a)) * b) in fp32, as the standalone act_and_mul kernel computes it."""
    a = a.to(tl.float32)
    if GELU_TANH:
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        z = tl.minimum(tl.maximum(z, -20.0), 20.0)
        act = 0.5 * a * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:
        act = a / (1.0 + tl.exp(-tl.maximum(a, -80.0)))
    act = act.to(dtype).to(tl.float32)
    return (act * b.to(tl.float32)).to(dtype)


@triton.jit
def _input_tile(x_rows, r_rows, norm_weight_ptr, cols, k, row_mask, inv_rms, PROLOGUE: tl.constexpr, dtype):
    """The prologue applied to input columns ``cols`` of every row: [ROWS, BLOCK_K] in the model dtype."""
    k_mask = cols < k
    mask = row_mask[:, None] & k_mask[None, :]
    if PROLOGUE == 0:
        a = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
    elif PROLOGUE == 1:
        xs = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rs = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        summed = (xs + rs).to(dtype).to(tl.float32)
        normed = (summed * inv_rms[:, None]).to(dtype).to(tl.float32)
        nw = tl.load(norm_weight_ptr + cols, mask=k_mask, other=0.0).to(tl.float32)
        a = (normed * nw[None, :]).to(dtype)
    else:
        gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        up = tl.load(x_rows + k + cols[None, :], mask=mask, other=0.0)
        a = _gated(gate, up, PROLOGUE == 3, dtype)
    return a


@triton.jit
def norm_prepass(x_rows, r_rows, residual_out_ptr, k, rows, row_mask, epsilon, pid, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr, dtype):  # fmt: skip
    """PROLOGUE 1's first pass: each row's 1 / rms of round(x + residual) [ROWS]; program 0 also stores that sum
    to ``residual_out`` (rows of k)."""
    tile = tl.arange(0, BLOCK_K)
    res_out_rows = residual_out_ptr + rows.to(tl.int64)[:, None] * k
    store_rows = row_mask & ((tl.zeros([ROWS], dtype=tl.int32) + pid) == 0)  # program 0 stores the sum
    sum_sq = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tile
        mask = row_mask[:, None] & (cols < k)[None, :]
        xs = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rs = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        summed = (xs + rs).to(dtype)
        tl.store(res_out_rows + cols[None, :], summed, mask=mask & store_rows[:, None])
        summed = summed.to(tl.float32)
        sum_sq += tl.sum(summed * summed, axis=1)
    return 1.0 / tl.sqrt(sum_sq / k + epsilon)


@triton.jit
def _accumulate(acc, a, w, ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc [ROWS, BLOCK_N] += a [ROWS, BLOCK_K] @ w [BLOCK_N, BLOCK_K]^T in fp32."""
    if ROWS == 1:
        acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    elif UPCAST:  # the CPU interpreter mis-computes 16-bit float dots; compute them in fp32 there
        acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def small_m_linear_kernel(
    x_ptr,
    x_row_stride,
    residual_ptr,
    residual_row_stride,
    norm_weight_ptr,
    residual_out_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    out_row_stride,
    num_rows,
    n,
    k,
    epsilon,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    dtype = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    rows = tl.arange(0, ROWS)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
    w_rows = weight_ptr + offs_n.to(tl.int64)[:, None] * k
    tile = tl.arange(0, BLOCK_K)
    if USE_PDL:  # the first weight tile, requested before waiting for the kernel ahead
        w_first = tl.load(w_rows + tile[None, :], mask=n_mask[:, None] & (tile < k)[None, :], other=0.0)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    r_rows = residual_ptr + rows.to(tl.int64)[:, None] * residual_row_stride
    inv_rms = tl.zeros([ROWS], dtype=tl.float32)
    if PROLOGUE == 1:
        inv_rms = norm_prepass(x_rows, r_rows, residual_out_ptr, k, rows, row_mask, epsilon, pid, ROWS, BLOCK_K,
                               dtype)  # fmt: skip

    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    k_start = 0
    if USE_PDL:  # the first tile apart (its weight is in flight), then the loop over the rest
        a = _input_tile(x_rows, r_rows, norm_weight_ptr, tile, k, row_mask, inv_rms, PROLOGUE, dtype)
        acc = _accumulate(acc, a, w_first, ROWS, DOT_PRECISION, UPCAST)
        k_start = BLOCK_K
    for k0 in range(k_start, k, BLOCK_K):
        cols = k0 + tile
        w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & (cols < k)[None, :], other=0.0)
        a = _input_tile(x_rows, r_rows, norm_weight_ptr, cols, k, row_mask, inv_rms, PROLOGUE, dtype)
        acc = _accumulate(acc, a, w, ROWS, DOT_PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    tl.store(out, acc.to(dtype), mask=row_mask[:, None] & n_mask[None, :])
