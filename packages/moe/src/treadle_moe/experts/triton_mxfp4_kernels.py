"""Triton grouped GEMM for MXFP4 fused MoE (imported lazily: this module imports triton).

The MXFP4 twin of triton_kernels.py's `fused_moe_gemm_kernel`: the same block alignment walk (program (pid_m, pid_n)
takes block pid_m of the sorted slots, all of one expert, and output columns [pid_n * BLOCK_N, +BLOCK_N)), the same
epilogue (HAS_BIAS: the expert's bias row added to the fp32 accumulators; the GATED activation, swigluoai included;
MUL_ROUTED_WEIGHT), with B the expert's MXFP4 blocks (experts/mxfp4.py): row n of the weight (an output column of
the GEMM; GATED: gate row n and up row N + n) is K / 2 contiguous bytes with one e8m0 scale per 32 inputs.

Each K step loads B's bytes as a [BLOCK_K, BLOCK_N] tile (element (k, n) reads byte k // 2 of row n and keeps its
low nibble for even k, its high one for odd k) and decodes in registers, no lookup table:
    code = nibble & 7;  twice = code for code < 2, else (2 | code & 1) << (code >> 1) - 1   (2 x the e2m1 magnitude)
    w = +-twice * 2^(s - 128)         the scale built as float32 bits ((s - 1) << 23)
exactly the spec's dequantized value, so rounding it to A's dtype for the dot loses nothing; the products are
accumulated in float32. A scale byte 0 (2^-127) is taken as 0. UPCAST (the CPU interpreter, and fp32 A): fp32
operands, IEEE dot. K must be a multiple of 32 (any BLOCK_K >= 16 works: each element reads its own block's scale).
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_moe.experts.triton_kernels import _swigluoai_and_mul
from treadle_moe.experts.triton_tiles import block_rows, finish_rows, program_tile


@triton.jit
def _mxfp4_tile(w_ptr, s_ptr, row_bytes, row_scales, offs_k, k_mask, offs_n, n_mask):
    """Rows offs_n, inputs offs_k of one expert's MXFP4 weight (blocks at w_ptr, scales at s_ptr) -> fp32 [BK, BN]."""
    tile_mask = k_mask[:, None] & n_mask[None, :]
    rows = offs_n.to(tl.int64)[None, :]
    byte = tl.load(w_ptr + rows * row_bytes + (offs_k // 2)[:, None], mask=tile_mask, other=0).to(tl.int32)
    nibble = (byte >> ((offs_k % 2) * 4)[:, None]) & 15
    code = nibble & 7
    twice = tl.where(code < 2, code, (2 | (code & 1)) << tl.maximum((code >> 1) - 1, 0))
    signed = tl.where(nibble >= 8, -twice, twice).to(tl.float32)
    s = tl.load(s_ptr + rows * row_scales + (offs_k // 32)[:, None], mask=tile_mask, other=1).to(tl.int32)
    scale = (tl.maximum(s - 1, 0) << 23).to(tl.float32, bitcast=True)
    return signed * scale


@triton.jit
def fused_moe_mxfp4_gemm_kernel(
    a_ptr, b_ptr, s_ptr, c_ptr, topk_weights_ptr, bias_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots,
    stride_am, stride_be, stride_se, stride_cm, stride_bias_e, alpha, limit,
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

    row_bytes = K // 2  # a weight row's bytes, and its scales
    row_scales = K // 32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_ptr = b_ptr + expert * stride_be
    es_ptr = s_ptr + expert * stride_se
    a_base = a_ptr + a_rows[:, None] * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_base + offs_k[None, :], mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
        w = _mxfp4_tile(w_ptr, es_ptr, row_bytes, row_scales, offs_k, k_mask, offs_n, n_mask)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        if GATED:
            w_up = _mxfp4_tile(w_ptr, es_ptr, row_bytes, row_scales, offs_k, k_mask, offs_n + N, n_mask)
            if UPCAST:
                acc_up = tl.dot(a.to(tl.float32), w_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, w_up.to(a.dtype), acc_up)

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
