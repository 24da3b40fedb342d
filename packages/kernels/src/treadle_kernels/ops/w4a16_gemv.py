"""The few-rows (decode) path of the Triton ``w4a16_linear`` provider: a GEMV on fp32 FMAs, no ``tl.dot``.

Why: a decode step reads every 4-bit weight once for a handful of rows, so the time is the weight's bytes over HBM
bandwidth, a quarter of the bf16 weight's; the tensor-core kernel (w4a16_linear_kernels.py) pads the rows to a
16-row tile and measured slower than the bf16 linear even at one row (H200, benchmarks/w4a16_gemm.py: 0.66-0.83x).

Kernel (``w4a16_gemv_kernel``): a program owns BLOCK_N output columns and BLOCK_M rows (a 3-D broadcast
[BLOCK_M, words, BLOCK_N]) and walks its share of K in steps of BLOCK_K input rows = BLOCK_K / 8 words per column.
A step loads the [1, BLOCK_K / 8, BLOCK_N] word tile (coalesced along n: 16-byte loads of 4 columns a thread) and
takes its eight nibble planes apart with one integer op each: plane j, at bits 4 j' (j' = j % 4) of the word (of
``word >> 16`` for j >= 4: one shift per word), is ``(word & 0xF << 4 j') | bits(2^(23 - 4 j'))``, which reads as
fp32 2^(23 - 4 j') + q exactly (the power of two's mantissa step is 16^j', so bit 4 j' is worth 1); one fp32
subtraction of 2^(23 - 4 j') + z leaves q - z, exact, with no per-nibble shift, int-to-float conversion or scaling.
Each plane is a broadcast FMA into a [BLOCK_M, words, BLOCK_N] fp32 tile; the sum over the words runs once, after
the K loop.
Scales and zero points: a step lies inside one group (BLOCK_K divides group_size, or one group per column), so one
[BLOCK_N] row of zero points (folded into the subtraction's constant) and one of scales (one multiply-add per word
into the accumulator) serve the whole step, no per-element loads; act order (``g_idx``) and group sizes no step
divides gather each row's scale and zero point instead (PER_ROW). Every product x (q - z) s is the spec's exact
fp32 value, so the result is the spec's (treadle_ir.ops.int4) up to the fp32 summation order, rounded once to x's
dtype.
Split K (grid axis 1, a launch parameter): a 4096-column projection has 64 column tiles of 64, too few programs to
keep 132 SMs streaming, so ``split_k`` programs share one tile's K; each stores fp32 partials and
``w4a16_reduce_kernel`` adds them in split order (deterministic), adds the bias and rounds once.
Compiled for sm_90 (Triton 3.9; SASS read, not timed): the production tiles take 72 (one row) to 161 (8 rows)
registers a thread, no spills, and the K loop has no shared-memory layout conversion (128-column tiles had two a
step, for the scale and zero rows); Triton does not software-pipeline these loads (num_stages has no effect), so
the programs resident on an SM at once hide the latency.

Rows: the K loop issues, per weight and row, 6.6 instructions at one row, 4.5 at two, 3.3 at four and 3.0 at eight
(one AND-OR, one subtraction and one FMA; the rest is addresses, masks, activation loads and conversions).
An H200 SM issues 128 a clock, 3.35e13/s over 132 SMs, so the issue rate bounds a weight at one row to ~2.0e-13 s
(~2.5 TB/s of 4-bit weight, against ~6e-13 s for a bf16 weight at ~3.3 TB/s: ~3x), at 3-4 rows (a 4-row block) to
~3.9e-13 s (~1.5x), and at 5-8 rows (an 8-row block) to ~7.0e-13 s (~0.85x, no better than the tensor-core kernel's
measured 0.71-0.96x at 16 rows). Measured on an H200 at Llama-3.1-8B's projections (benchmarks/w4a16_gemm.py,
session 34 call 4, zero points, GEMV against the tensor-core kernel): 1 row 11.4 / 20.9 us (qkv) .. 38.1 / 80.9
(gate_up), 1.03-1.44x bf16; 2 rows 14.5 / 21.7 .. 58.4 / 80.4, 0.94-1.12x bf16; but 3 rows 22.0 / 21.7 .. 88.8 /
80.7 and 4 rows 22.2 / 21.6 .. 89.1 / 80.1. Hence ``DEFAULT_MAX_ROWS`` = 2; ``TREADLE_W4A16_GEMV_MAX_ROWS`` moves it
(0 to 16; 0 turns the GEMV off).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .w4a16_linear import _per_row, split_k_launch

__all__ = ["DEFAULT_MAX_ROWS", "MAX_ROWS", "GemvConfig", "choose_gemv_config", "launch_gemv"]

DEFAULT_MAX_ROWS = 2
# the knob's limit: at 16 rows the FMAs alone cost more than the bf16 weight's bytes (above)
MAX_ROWS = 16
# rows per program (registers); 9-16 rows run two row blocks per column tile, neighbours in launch order
MAX_BLOCK_M = 8
# split-K target at one row: about the programs one SM holds at once (72 registers a thread: seven 4-warp programs),
# so the grid is about one wave with 8 word tiles of 4 KB in flight per SM; half that from 2 rows (120-161 registers)
PROGRAMS_PER_SM = 8
# the bits of fp32 2^23: OR-ing an integer below 2^23 into them reads as 2^23 + it; minus j << 25: 2^(23 - 4 j)
MAGIC = tl.constexpr(0x4B000000)


class GemvConfig(NamedTuple):
    """Tiles and launch shape of ``w4a16_gemv_kernel``."""

    # rows per program (a power of two)
    block_m: int
    # output columns per program
    block_n: int
    # input rows per step (a power of two >= 8: whole int32 words)
    block_k: int
    # programs sharing one column tile's K (fp32 partials, then an in-order reduction)
    split_k: int
    num_warps: int
    num_stages: int


def choose_gemv_config(
    num_rows: int, n: int, k: int, group_size: int, sms: int, on_gpu: bool = True
) -> GemvConfig:
    """The tiles for num_rows (<= MAX_ROWS) x [k -> n]: the [block_m, block_k / 8, block_n] fp32 accumulator at
    8-32 registers a thread (4 warps) and 4 columns a thread (16-byte word loads, each activation load feeding 4
    columns' FMAs): more rows, fewer words per step."""
    num_rows = max(1, num_rows)
    block_m = min(MAX_BLOCK_M, 1 << (num_rows - 1).bit_length())
    block_n, block_k = (64, 128) if block_m <= 2 else (64, 64)
    if not on_gpu:
        # the interpreter: small tiles run fast and leave partial tiles to check
        block_n, block_k = 32, 32
    if group_size < k and group_size % 8 == 0 and group_size & (group_size - 1) == 0:
        # one group per step
        block_k = min(block_k, group_size)
    steps = -(-k // block_k)
    tiles = -(-n // block_n) * -(-num_rows // block_m)
    # partials cost 8 bytes per (split, row, column); keep them under a quarter of the weight's k * n / 2 bytes
    per_sm = PROGRAMS_PER_SM if block_m == 1 else PROGRAMS_PER_SM // 2
    split = max(1, min(steps, per_sm * sms // tiles, k // (64 * num_rows)))
    return GemvConfig(block_m, block_n, block_k, split, 4, 1)


def launch_gemv(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    cfg: GemvConfig,
) -> torch.Tensor:
    """``w4a16_linear`` by the GEMV kernel with tiles `cfg` (the provider's dispatch, tests and benchmarks)."""
    assert cfg.block_k % 8 == 0 and cfg.block_m >= 1, f"bad GEMV tiles {cfg}"

    def run(x2: torch.Tensor, parts: torch.Tensor, per_split: int, split: int) -> None:
        m, k = x2.shape
        n = parts.shape[-1]
        steps = -(-k // cfg.block_k)
        # a step lies in one group unless PER_ROW: the steps of a group, all of them for one group per column
        steps_per_group = steps if group_size >= k else max(1, group_size // cfg.block_k)
        grid = (-(-n // cfg.block_n) * -(-m // cfg.block_m), split)
        w4a16_gemv_kernel[grid](
            x2, x2.stride(0), packed_weight, scales, zeros if zeros is not None else packed_weight,
            g_idx if g_idx is not None else packed_weight, bias if bias is not None else scales, parts, m, n, k,
            group_size, steps_per_group, per_split, HAS_ZEROS=zeros is not None,
            PER_ROW=_per_row(group_size, k, g_idx, cfg.block_k),
            G_IDX=g_idx is not None, HAS_BIAS=bias is not None, PARTIALS=split > 1, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    return split_k_launch(x, packed_weight.shape[1], bias, cfg.block_k, cfg.split_k, run)


@triton.jit
def _plane_minus_zero(words, high, z, J: tl.constexpr):
    """Nibble plane J of a word tile minus the zero point z, q - z as fp32 (exact): the nibble's bits OR-ed into
    those of 2^(23 - 4 (J % 4)), whose mantissa step is then 16^(J % 4), read as fp32 2^(23 - 4 (J % 4)) + q; one
    subtraction of 2^(23 - 4 (J % 4)) + z leaves q - z."""
    src = words if J < 4 else high
    bits = (src & (0xF << (4 * (J % 4)))) | (MAGIC - ((J % 4) << 25))
    return bits.to(tl.float32, bitcast=True) - (z + (1 << (23 - 4 * (J % 4))))


@triton.jit
def w4a16_gemv_kernel(x_ptr, x_row_stride, weight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, out_ptr, m, n,
                      k, group_size, steps_per_group, steps_per_split, HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr,
                      G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """out[r, c] = sum_k x[r, k] * (q[k, c] - z[g(k), c]) * s[g(k), c] (+ bias[c]) over this program's split of K
    (PARTIALS: fp32 partials [splits, m, n], no bias)."""
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    # the row blocks of one column tile are neighbours in launch order: the weight tile's second read hits L2
    blocks_m = tl.cdiv(m, BLOCK_M)
    offs_n = (tl.program_id(0) // blocks_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (tl.program_id(0) % blocks_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < n
    m_mask = offs_m < m
    # [BLOCK_M, 1]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * x_row_stride
    acc = tl.zeros([BLOCK_M, BLOCK_W, BLOCK_N], dtype=tl.float32)
    first_step = split * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, tl.cdiv(k, BLOCK_K))
    # without PER_ROW: the group of the step (steps_per_group steps of one group follow each other; counted, not
    # divided, each step) and the steps left in it
    group = first_step // steps_per_group
    group_left = steps_per_group - first_step % steps_per_group
    for step in range(first_step, last_step):
        k0 = step * BLOCK_K
        word_rows = k0 // 8 + offs_w
        w_mask = word_rows < k // 8
        # [1, BLOCK_W, BLOCK_N]: loaded as a 3-D tile, so its coalesced layout is the accumulator's (a 2-D tile
        # would go through shared memory to reach it)
        tile_mask = w_mask[None, :, None] & n_mask[None, None, :]
        words = tl.load(weight_ptr + word_rows.to(tl.int64)[None, :, None] * n + offs_n[None, None, :],
                        mask=tile_mask, other=0)  # fmt: skip
        high = words >> 16
        x_mask = m_mask[:, None] & w_mask[None, :]
        if PER_ROW:
            for j in tl.static_range(8):
                rows = word_rows * 8 + j
                # [BLOCK_M, BLOCK_W]
                xj = tl.load(x_rows + rows[None, :], mask=x_mask, other=0.0).to(tl.float32)
                if G_IDX:
                    groups = tl.load(g_idx_ptr + rows, mask=w_mask, other=0)
                else:
                    groups = rows // group_size
                at = groups.to(tl.int64)[None, :, None] * n + offs_n[None, None, :]
                s = tl.load(scales_ptr + at, mask=tile_mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    z = tl.load(zeros_ptr + at, mask=tile_mask, other=0).to(tl.float32)
                else:
                    z = 8.0
                acc += xj[:, :, None] * (_plane_minus_zero(words, high, z, j) * s)
        else:
            at = group.to(tl.int64) * n + offs_n
            group_left -= 1
            group = tl.where(group_left == 0, group + 1, group)
            group_left = tl.where(group_left == 0, steps_per_group, group_left)
            s = tl.load(scales_ptr + at, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + at, mask=n_mask, other=0).to(tl.float32)[None, None, :]
            else:
                z = 8.0
            part = tl.zeros([BLOCK_M, BLOCK_W, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_rows + (word_rows * 8 + j)[None, :], mask=x_mask, other=0.0).to(tl.float32)
                part += xj[:, :, None] * _plane_minus_zero(words, high, z, j)
            acc += part * s[None, None, :]

    # [BLOCK_M, BLOCK_N]
    total = tl.sum(acc, axis=1)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if PARTIALS:
        part_rows = (split * m + offs_m).to(tl.int64)
        tl.store(out_ptr + part_rows[:, None] * n + offs_n[None, :], total, mask=out_mask)
    else:
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=out_mask)
