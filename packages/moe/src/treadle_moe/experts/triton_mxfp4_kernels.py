"""Triton grouped GEMM for MXFP4 fused MoE (imported lazily: this module imports triton).

The MXFP4 twin of triton_kernels.py's `fused_moe_gemm_kernel`: the same block alignment walk (program (pid_m, pid_n)
takes block pid_m of the sorted slots, all of one expert, and output columns [pid_n * BLOCK_N, +BLOCK_N)), the same
epilogue (HAS_BIAS: the expert's bias row added to the fp32 accumulators; the GATED activation, swigluoai included;
MUL_ROUTED_WEIGHT), with B the expert's MXFP4 blocks (experts/mxfp4.py): row n of the weight (an output column of
the GEMM; GATED: gate row n and up row N + n) is K / 2 contiguous bytes with one e8m0 scale per 32 inputs.

Each K step (BLOCK_K a multiple of 32) walks its 32-input scale blocks one by one (`_group_dot`): per weight row the
block's 16 contiguous bytes, loaded straight into the dot's [16, BLOCK_N] orientation (no join, reshape or transpose
of the tile), each byte's low nibble input 2j and its high nibble input 2j + 1; so the block is two dots of K 16, A's
even inputs against the low nibbles and its odd inputs against the high ones, each nibble decoded in registers, no
lookup table:
    code = nibble & 7;  twice = code for code < 2, else (2 | code & 1) << (code >> 1) - 1   (2 x the e2m1 magnitude)
and the block's fp32 sum is multiplied by each row's scale 2^(s - 128) (built as float32 bits, (s - 1) << 23) before
it joins the accumulator. Twice an e2m1 value is a small integer, exact in A's dtype, so the products are the spec's
up to fp32 summation order. A scale byte 0 (2^-127) is taken as 0. UPCAST (the CPU interpreter, and fp32 A): fp32
operands, IEEE dot. K must be a multiple of 32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_moe.experts.triton_kernels import _swigluoai_and_mul
from treadle_moe.experts.triton_tiles import block_rows, finish_rows, program_tile


@triton.jit
def _e2m1(nibble):
    """Nibbles (int32) -> their e2m1 values times 2, as float32 (module docstring)."""
    code = nibble & 7
    twice = tl.where(code < 2, code, (2 | (code & 1)) << tl.maximum((code >> 1) - 1, 0))
    return tl.where(nibble >= 8, -twice, twice).to(tl.float32)


@triton.jit
def _group_dot(acc, a_even, a_odd, w_ptr, s_ptr, row_bytes, row_scales, kg, K, rows, n_mask,
               UPCAST: tl.constexpr):  # fmt: skip
    """acc + the products of one 32-input scale block (inputs [kg, kg + 32)) for weight rows `rows`: the block's 16
    bytes per row loaded as a [16, BN] tile (byte j of every row: inputs 2j, low nibble, and 2j + 1, high nibble),
    decoded to twice their e2m1 values (exact in A's dtype), two dots against A's even and odd inputs, and the fp32
    sum times the rows' scales 2^(s - 128) (twice the value times 2^(s - 128) is the value times 2^(s - 127))."""
    offs_b = kg // 2 + tl.arange(0, 16)
    byte_mask = n_mask[None, :] & (offs_b < K // 2)[:, None]
    byte = tl.load(w_ptr + rows[None, :] * row_bytes + offs_b[:, None], mask=byte_mask, other=0).to(tl.int32)
    # a block past K (the last step of a K that BLOCK_K does not divide) reads no scale: its bytes are all 0
    s = tl.load(s_ptr + rows * row_scales + kg // 32, mask=n_mask & (kg + 0 * rows < K), other=0).to(tl.int32)
    scale = (tl.maximum(s - 1, 0) << 23).to(tl.float32, bitcast=True)  # [BN]: 2^(s - 128); byte 0 -> 0
    if UPCAST:
        part = tl.dot(a_even.to(tl.float32), _e2m1(byte & 15), input_precision="ieee")
        part = tl.dot(a_odd.to(tl.float32), _e2m1(byte >> 4), part, input_precision="ieee")
    else:
        part = tl.dot(a_even, _e2m1(byte & 15).to(a_even.dtype))
        part = tl.dot(a_odd, _e2m1(byte >> 4).to(a_odd.dtype), part)
    return acc + part * scale[None, :]


@triton.jit
def fused_moe_mxfp4_gemm_kernel(
    a_ptr, b_ptr, s_ptr, c_ptr, topk_weights_ptr, bias_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots,
    stride_am, stride_be, stride_bn, stride_se, stride_sn, stride_cm, stride_bias_e, alpha, limit,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, live = program_tile(num_tokens_post_padded_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    slots, slot_mask, expert, a_rows, live = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_slots,
                                                        A_ROWS_PER_TOKEN, BLOCK_M)  # fmt: skip
    if not live:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_ptr = b_ptr + expert * stride_be
    es_ptr = s_ptr + expert * stride_se
    a_base = a_ptr + a_rows[:, None] * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = offs_n.to(tl.int64)
    pairs = 2 * tl.arange(0, 16)  # a scale block's even inputs (relative); the odd ones follow each
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        for g in tl.static_range(BLOCK_K // 32):
            kg = step * BLOCK_K + g * 32
            a_mask = slot_mask[:, None] & (kg + pairs < K)[None, :]
            a_even = tl.load(a_base + (kg + pairs)[None, :], mask=a_mask, other=0.0)
            a_odd = tl.load(a_base + (kg + 1 + pairs)[None, :], mask=a_mask, other=0.0)
            acc = _group_dot(
                acc, a_even, a_odd, w_ptr, es_ptr, stride_bn, stride_sn, kg, K, rows, n_mask, UPCAST
            )
            if GATED:
                acc_up = _group_dot(acc_up, a_even, a_odd, w_ptr, es_ptr, stride_bn, stride_sn, kg, K, rows + N,
                                    n_mask, UPCAST)  # fmt: skip

    if HAS_BIAS:
        bias_row = bias_ptr + expert * stride_bias_e + offs_n  # [BN]; contiguous rows of [E, 2N] or [E, K]
        acc += tl.load(bias_row, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_row + N, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 2:
        acc = _swigluoai_and_mul(acc, acc_up, alpha, limit)
        finish_rows(acc, acc_up, c_ptr, stride_cm, 1, slots, slot_mask, offs_n, n_mask, topk_weights_ptr, False, 0,
                    MUL_ROUTED_WEIGHT, ROUND=False)  # fmt: skip
    else:
        finish_rows(acc, acc_up, c_ptr, stride_cm, 1, slots, slot_mask, offs_n, n_mask, topk_weights_ptr, GATED,
                    ACTIVATION, MUL_ROUTED_WEIGHT, ROUND=False)  # fmt: skip
