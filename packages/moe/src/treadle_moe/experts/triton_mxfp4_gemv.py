"""Triton GEMV for MXFP4 fused MoE at decode sizes (imported lazily: this module imports triton).

When an expert sees a few rows (decode: tokens x top_k spread over the experts), `tl.dot`'s 16-row minimum wastes
most of its work and the kernel is bound by decoding the weights, not by reading them. This kernel has no dot: a
program takes block pid_m of the sorted slots (BLOCK_M of 1-8 rows of one expert, the same block alignment walk and
epilogue as triton_mxfp4_kernels.py) and BLOCK_N weight rows, and per K step of GROUPS scale blocks
- loads the rows' words: B's uint8 blocks seen as int32, [BLOCK_N, GROUPS, 4] (a scale block's 16 bytes are 4
  words, so each thread can take one block in one 16-byte load), and the [BLOCK_N, GROUPS] scale bytes;
- decodes nibble i (0-7) of every word, the input 32 g + 8 t + i of word t of block g, with three integer operations
  and a multiply, no table: the code bits (e1 e0 m) shifted to float32 bits 24-22 and the sign to bit 31 make the
  value times 2^-126 (code 1, 0.5, a subnormal), and times 2^126 it is the e2m1 value exactly;
- multiplies by the matching inputs of its BLOCK_M rows (fp32 FMAs: products of two values of at most 8 significant
  bits are exact), sums the 32 products of each scale block and only then applies the block's scale 2^(s - 127)
  (float32 bits s << 23; a scale byte 0, 2^-127, is taken as 0 as the dot kernel does).
So each weight value costs the memory's half byte and a handful of ALU operations, and the weights of an expert are
read once per program. K must be a multiple of 32 (MXFP4 layout); N and K need not be multiples of the blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_moe.experts.triton_mxfp4_kernels import mxfp4_epilogue
from treadle_moe.experts.triton_tiles import block_rows, program_tile

_SIGN = tl.constexpr(-2147483648)  # bit 31 of an int32
# float32 bits 24-22: the lowest two exponent bits and the top mantissa bit
_CODE_BITS = tl.constexpr(0x01C00000)
_TWO_POW_126 = tl.constexpr(8.507059173023462e37)


@triton.jit
def _nibble_values(words, i: tl.constexpr):
    """Nibble i of int32 `words` -> its e2m1 value (float32, exact; module docstring)."""
    if i < 6:
        code = (words << (22 - 4 * i)) & _CODE_BITS
    else:
        code = (words >> (4 * i - 22)) & _CODE_BITS
    sign = (words << (28 - 4 * i)) & _SIGN
    return (code | sign).to(tl.float32, bitcast=True) * _TWO_POW_126


@triton.jit
def _rows_times_blocks(a_base, k_base, a_mask, words, scale, acc, BLOCK_M: tl.constexpr):
    """acc [BM, BN] + sum over the step's scale blocks g of scale[n, g] * sum_k a[m, k] * e2m1(words[n, g])[k]:
    a_base [BM, 1, 1] pointers to A's rows, k_base [1, G, 4] the input of nibble 0 of each word, words [BN, G, 4].
    One row (BLOCK_M 1) stays in three dimensions."""
    if BLOCK_M == 1:
        prod = tl.zeros(words.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            a = tl.load(a_base + k_base + i, mask=a_mask, other=0.0).to(tl.float32)  # [1, G, 4]
            prod += a * _nibble_values(words, i)
        acc += tl.sum(tl.sum(prod, axis=2) * scale, axis=1)[None, :]
    else:
        prods = tl.zeros((BLOCK_M, words.shape[0], words.shape[1], words.shape[2]), dtype=tl.float32)
        for i in tl.static_range(8):
            a = tl.load(a_base + k_base + i, mask=a_mask, other=0.0).to(tl.float32)  # [BM, G, 4]
            prods += a[:, None, :, :] * _nibble_values(words, i)[None, :, :, :]
        acc += tl.sum(tl.sum(prods, axis=3) * scale[None, :, :], axis=2)
    return acc


@triton.jit
def _e8m0(s_rows, groups, mask):
    """The scale bytes at s_rows [BN, 1] + groups [1, G] -> 2^(s - 127) as float32 (byte 0 -> 0)."""
    s = tl.load(s_rows + groups, mask=mask, other=0).to(tl.int32)
    return (s << 23).to(tl.float32, bitcast=True)


@triton.jit
def fused_moe_mxfp4_gemv_kernel(
    a_ptr, w_ptr, s_ptr, c_ptr, topk_weights_ptr, bias_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_cm, stride_bias_e, alpha, limit,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """w_ptr: the MXFP4 blocks as int32 [E, ROWS, K / 8] (4 words per scale block); the rest as the dot kernel."""
    pid_m, pid_n, live = program_tile(num_tokens_post_padded_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    slots, slot_mask, expert, a_rows, live = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_slots,
                                                        A_ROWS_PER_TOKEN, BLOCK_M)  # fmt: skip
    if not live:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, GROUPS)
    offs_t = tl.arange(0, 4)
    rows = offs_n.to(tl.int64)
    w_rows = w_ptr + expert * stride_we + rows[:, None, None] * stride_wn  # [BN, 1, 1]
    s_rows = s_ptr + expert * stride_se + rows[:, None] * stride_sn  # [BN, 1]
    a_base = a_ptr + a_rows[:, None, None] * stride_am  # [BM, 1, 1]
    num_groups = K // 32

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        groups = g0 + offs_g
        g_mask = groups < num_groups
        words_at = groups[None, :, None] * 4 + offs_t[None, None, :]  # [1, G, 4]
        w_mask = n_mask[:, None, None] & g_mask[None, :, None]
        s_mask = n_mask[:, None] & g_mask[None, :]
        a_mask = slot_mask[:, None, None] & g_mask[None, :, None]
        k_base = groups[None, :, None] * 32 + offs_t[None, None, :] * 8  # [1, G, 4]
        words = tl.load(w_rows + words_at, mask=w_mask, other=0)
        scale = _e8m0(s_rows, groups[None, :], s_mask)
        acc = _rows_times_blocks(a_base, k_base, a_mask, words, scale, acc, BLOCK_M)
        if GATED:
            words_up = tl.load(w_rows + N * stride_wn + words_at, mask=w_mask, other=0)
            scale_up = _e8m0(s_rows + N * stride_sn, groups[None, :], s_mask)
            acc_up = _rows_times_blocks(a_base, k_base, a_mask, words_up, scale_up, acc_up, BLOCK_M)

    mxfp4_epilogue(acc, acc_up, c_ptr, stride_cm, topk_weights_ptr, bias_ptr, expert, stride_bias_e, slots, slot_mask,
                   offs_n, n_mask, N, alpha, limit, GATED, ACTIVATION, MUL_ROUTED_WEIGHT, HAS_BIAS)  # fmt: skip
