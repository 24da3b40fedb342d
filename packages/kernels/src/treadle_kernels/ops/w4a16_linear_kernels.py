"""Triton kernels of ``w4a16_linear`` (imported lazily: this module imports triton).

``w4a16_gemm_kernel``: ``out[r, c] = sum_k x[r, k] * (q[k, c] - z[g(k), c]) * s[g(k), c] (+ bias[c])`` on the packed
layout of treadle_ir.ops.int4 (int32 [k / 8, n] words, scales and zeros [num_groups, n]). Grid: one program per
(BLOCK_M x BLOCK_N output tile, K split); programs walk the output tiles GROUP_M row tiles at a time, so those
share the weight tiles they stream through L2 (prefill). Each K step loads a [BLOCK_K / 8, BLOCK_N] tile of words
(coalesced along n) and unpacks it in registers: EXPAND 1 shifts every word into its eight nibbles ([BLOCK_K / 8,
8, BLOCK_N], reshaped to [BLOCK_K, BLOCK_N]); EXPAND 0 loads the word of each row instead (eight loads of one word,
served by L1) and shifts it by 4 * (row % 8).
Scales and zeros, two ways (host-chosen):
- PER_ROW 0: the K step lies in one group (BLOCK_K divides group_size, or one group per column): the integers
  q - z (exact in a 16-bit float) go to ``tl.dot`` with x's own dtype, and the fp32 partial sum is scaled per
  output column; the products are the spec's exact ones, only summed in another order;
- PER_ROW 1: each row's group (row // group_size, or g_idx[row] with G_IDX: act order) gathers its scale and zero
  point; the dequantized tile is rounded to x's dtype for the dot.
K split (few rows: not enough output tiles to keep every SM streaming the weight; grid axis 1): with PARTIALS each
program sums its share of the K steps and stores fp32 partials [splits, m, n]; ``w4a16_reduce_kernel`` adds them in
split order (the result does not depend on scheduling), adds the bias and rounds once. Without, the one program per
tile stores the rounded result itself. The split count is a runtime value: one compile serves every projection.
UPCAST (the CPU interpreter, which mis-computes 16-bit dots; and fp32 x): fp32 operands, IEEE dot.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_tile(weight_ptr, n, k, k0, offs_n, n_mask, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                EXPAND: tl.constexpr):  # fmt: skip
    """q [BLOCK_K, BLOCK_N] int32 (0..15) of rows k0 .. k0 + BLOCK_K, columns offs_n (0 past k or n)."""
    if EXPAND:
        word_rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        mask = (word_rows < k // 8)[:, None] & n_mask[None, :]
        words = tl.load(
            weight_ptr + word_rows.to(tl.int64)[:, None] * n + offs_n[None, :], mask=mask, other=0
        )
        shifts = tl.arange(0, 8) * 4
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    else:
        rows = k0 + tl.arange(0, BLOCK_K)
        mask = (rows < k)[:, None] & n_mask[None, :]
        words = tl.load(
            weight_ptr + (rows // 8).to(tl.int64)[:, None] * n + offs_n[None, :], mask=mask, other=0
        )
        q = (words >> ((rows % 8) * 4)[:, None]) & 0xF
    return q


@triton.jit
def w4a16_gemm_kernel(
    x_ptr,
    x_row_stride,
    weight_ptr,
    scales_ptr,
    zeros_ptr,
    g_idx_ptr,
    bias_ptr,
    out_ptr,
    m,
    n,
    k,
    group_size,
    steps_per_split,
    HAS_ZEROS: tl.constexpr,
    PER_ROW: tl.constexpr,
    G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PARTIALS: tl.constexpr,
    GROUP_M: tl.constexpr,
    EXPAND: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    band = pid // (GROUP_M * tiles_n)  # GROUP_M row tiles walked column tile by column tile
    first_m = band * GROUP_M
    band_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % band_m
    pid_n = (pid % (GROUP_M * tiles_n)) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < m
    n_mask = offs_n < n
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_row_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first_step = split * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, tl.cdiv(k, BLOCK_K))
    for step in range(first_step, last_step):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k
        a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = unpack_tile(weight_ptr, n, k, k0, offs_n, n_mask, BLOCK_K, BLOCK_N, EXPAND)
        if PER_ROW:
            if G_IDX:
                groups = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
            else:
                groups = offs_k // group_size
            at = groups.to(tl.int64)[:, None] * n + offs_n[None, :]
            tile_mask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(scales_ptr + at, mask=tile_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + at, mask=tile_mask, other=0).to(tl.int32)
            else:
                z = tl.full([BLOCK_K, BLOCK_N], 8, tl.int32)
            w = (q - z).to(tl.float32) * s
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
        else:
            at = (k0 // group_size).to(tl.int64) * n + offs_n
            s = tl.load(scales_ptr + at, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + at, mask=n_mask, other=0).to(tl.int32)
            else:
                z = tl.full([BLOCK_N], 8, tl.int32)
            w = q - z[None, :]  # exact small integers
            if UPCAST:
                part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(a, w.to(a.dtype))
            acc += part * s[None, :]

    out_mask = m_mask[:, None] & n_mask[None, :]
    if not PARTIALS:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_rows = (split * m + offs_m).to(tl.int64)
        tl.store(out_ptr + part_rows[:, None] * n + offs_n[None, :], acc, mask=out_mask)


@triton.jit
def w4a16_reduce_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    m,
    n,
    splits,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[r, c] = sum over the splits, in order, of part[split, r, c] (+ bias[c]), rounded once."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for split in range(splits):
        acc += tl.load(part_ptr + (split * m + row) * n + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def w4a16_dequant_kernel(weight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, n, k, group_size,
                         HAS_ZEROS: tl.constexpr, G_IDX: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
    """out [k, n] in out's dtype = (q - z) * s of every row (the spec's dequantized weight, transposed): one program
    per [BLOCK_W words = 8 * BLOCK_W rows, BLOCK_N columns] tile; each word row's eight nibbles are eight output
    rows, each stored whole along n."""
    word_rows = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = word_rows < k // 8
    mask = row_ok[:, None] & (offs_n < n)[None, :]
    words = tl.load(weight_ptr + word_rows.to(tl.int64)[:, None] * n + offs_n[None, :], mask=mask, other=0)
    for j in tl.static_range(8):
        rows = word_rows * 8 + j
        if G_IDX:
            group = tl.load(g_idx_ptr + rows, mask=row_ok, other=0)
        else:
            group = rows // group_size
        at_group = group.to(tl.int64)[:, None] * n + offs_n[None, :]
        scale = tl.load(scales_ptr + at_group, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + at_group, mask=mask, other=0).to(tl.float32)
        else:
            zero = 8.0
        value = (((words >> (4 * j)) & 0xF).to(tl.float32) - zero) * scale
        out = out_ptr + rows.to(tl.int64)[:, None] * n + offs_n[None, :]
        tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)
