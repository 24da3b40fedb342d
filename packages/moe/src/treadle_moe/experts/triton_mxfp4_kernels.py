"""Triton grouped GEMM for MXFP4 fused MoE (imported lazily: this module imports triton).

The MXFP4 twin of triton_kernels.py's `fused_moe_gemm_kernel`: the same block alignment walk (program (pid_m, pid_n)
takes block pid_m of the sorted slots, all of one expert, and output columns [pid_n * BLOCK_N, +BLOCK_N)), the same
epilogue (HAS_BIAS: the expert's bias row added to the fp32 accumulators; the GATED activation, swigluoai included;
MUL_ROUTED_WEIGHT), with B the expert's MXFP4 blocks (experts/mxfp4.py): row n of the weight (an output column of
the GEMM; GATED: gate row n and up row N + n) is K / 2 contiguous bytes with one e8m0 scale per 32 inputs.

Each K step (BLOCK_K a multiple of 32: whole scale blocks) loads, per weight row, its BLOCK_K / 2 contiguous bytes
(a [BLOCK_N, BLOCK_K / 2] tile: wide, pipelined loads when the row stride is a multiple of 16 bytes, as gpt-oss's
are) and its BLOCK_K / 32 scale bytes, and decodes in registers, no lookup table:
    the code bits (e1 e0 m) placed at float32 bits 24-22 and the sign at bit 31 are the value times 2^-126 (code 1,
    0.5, a subnormal), so times 2^126 the e2m1 value exactly;  w = e2m1 * 2^(s - 127), the scale float32 bits s << 23
the low and high nibbles joined into inputs 2j and 2j + 1, each 32 inputs times their block's scale, transposed to the
dot's [BLOCK_K, BLOCK_N]. That is exactly the spec's dequantized value, so rounding it to A's dtype for the dot loses
nothing; the products are accumulated in float32. BF16_ASM (bf16 A on a GPU): the same bit placement in bf16, two
weights a 32-bit register, by inline PTX (`_BF16_DECODE`, about 4 instructions a weight against about 8), so the
tile is bf16 from the start; Nsight Compute, gpt-oss-20b's w13 GEMM at 1 token: 17.5M instructions against 23.5M.
A scale byte 0 (2^-127) is taken as 0. UPCAST (the CPU interpreter, and fp32 A): fp32 operands, IEEE dot.
SWAP_AB: the dot computes C^T = W A^T, the decoded [BLOCK_N, BLOCK_K] tile its left operand as it is (no transpose),
A^T [BLOCK_K, BLOCK_M] loaded transposed, the accumulators transposed once before the epilogue. K must be a multiple
of 32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_moe.experts.triton_kernels import _swigluoai_and_mul
from treadle_moe.experts.triton_tiles import block_rows, finish_rows, program_tile


@triton.jit
def _e2m1(nibble):
    """Nibbles (int32, 0-15) -> their e2m1 values as float32 (module docstring)."""
    bits = ((nibble & 7) << 22) | ((nibble & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126


# Four bytes ($4) and their four scale bytes ($5) -> the eight bf16 values: $0 $1 the low nibbles' (bytes 0-1, 2-3),
# $2 $3 the high ones'. prmt spreads two bytes into the halves of a word; in each half the code bits go to bf16 bits
# 8-6 and the sign to bit 15 (the value times 2^-126, a bf16 subnormal for code 1), one multiply by 2^126 (0x7E80)
# makes the e2m1 value, one by the scale pair (scale byte s -> bf16 bits s << 7: 2^(s - 127); s = 0 -> 0) the weight.
def _bf16_pair(source: str, selector: str, out: str, scale: str) -> str:
    """PTX for one output register: two bytes of `source` (prmt `selector`) -> two bf16 weights, times `scale`."""
    return f"""prmt.b32 p, {source}, z, {selector};
shl.b32 x, p, 6;
shl.b32 y, p, 12;
and.b32 y, y, 0x80008000;
lop3.b32 p, x, 0x01C001C0, y, 0xEA;
mul.rn.bf16x2 p, p, c;
mul.rn.bf16x2 {out}, p, {scale};
"""


_BF16_DECODE = tl.constexpr(
    """{
.reg .b32 v, p, x, y, s01, s23, c, z;
mov.b32 z, 0;
mov.b32 c, 0x7E807E80;
prmt.b32 s01, $5, z, 0x4140;
shl.b32 s01, s01, 7;
prmt.b32 s23, $5, z, 0x4342;
shl.b32 s23, s23, 7;
shr.b32 v, $4, 4;
"""
    + _bf16_pair("$4", "0x4140", "$0", "s01")
    + _bf16_pair("$4", "0x4342", "$1", "s23")
    + _bf16_pair("v", "0x4140", "$2", "s01")
    + _bf16_pair("v", "0x4342", "$3", "s23")
    + "}"
)


@triton.jit
def _mxfp4_tile(w_ptr, s_ptr, row_bytes, row_scales, k0, K, offs_n, n_mask, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr, BF16_ASM: tl.constexpr):  # fmt: skip
    """Rows offs_n, inputs [k0, k0 + BLOCK_K) of one expert's MXFP4 weight (blocks at w_ptr, scales at s_ptr) ->
    fp32 [BLOCK_K, BLOCK_N] (SWAP_AB: [BLOCK_N, BLOCK_K], as decoded; BF16_ASM: bf16 by _BF16_DECODE). k0 and
    BLOCK_K are multiples of 32, so the step holds whole scale blocks."""
    rows = offs_n.to(tl.int64)[:, None]
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # the bytes of the step in a row: contiguous
    byte_mask = n_mask[:, None] & (offs_b < K // 2)[None, :]
    byte = tl.load(w_ptr + rows * row_bytes + offs_b[None, :], mask=byte_mask, other=0)
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    group_mask = n_mask[:, None] & (offs_g < K // 32)[None, :]
    s = tl.load(s_ptr + rows * row_scales + offs_g[None, :], mask=group_mask, other=1)
    if BF16_ASM:
        # each byte's scale byte beside it: [BN, BK / 2]
        s_bytes = tl.reshape(
            tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)), (BLOCK_N, BLOCK_K // 2)
        )
        low, high = tl.inline_asm_elementwise(_BF16_DECODE, "=r,=r,=r,=r,r,r", [byte, s_bytes],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)  # fmt: skip
        w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    else:
        byte = byte.to(tl.int32)
        # [BN, BK / 2, 2] -> [BN, BK]: input 2j is byte j's low nibble, 2j + 1 its high one
        w = tl.reshape(tl.join(_e2m1(byte & 15), _e2m1(byte >> 4)), (BLOCK_N, BLOCK_K))
        scale = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # [BN, BK / 32]: 2^(s - 127)
        w = tl.reshape(tl.reshape(w, (BLOCK_N, BLOCK_K // 32, 32)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    # one return per jit function: the compiler visits code after a return under a constexpr branch
    if not SWAP_AB:
        w = tl.trans(w)
    return w


@triton.jit
def _mac(acc, a, w, UPCAST: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc + a @ w (a [BM, BK], w [BK, BN]), or SWAP_AB: acc + w @ a (w [BN, BK], a [BK, BM]); fp32 accumulators."""
    if SWAP_AB:
        if UPCAST:
            acc = tl.dot(w, a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(a.dtype), a, acc)
    elif UPCAST:
        acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


@triton.jit
def fused_moe_mxfp4_gemm_kernel(
    a_ptr, b_ptr, s_ptr, c_ptr, topk_weights_ptr, bias_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots,
    stride_am, stride_be, stride_bn, stride_se, stride_sn, stride_cm, stride_bias_e, alpha, limit,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr, BF16_ASM: tl.constexpr = False,
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
    # SWAP_AB: the products transposed, C^T = W A^T (the weight tile the dot's left operand, as decoded)
    if SWAP_AB:
        a_base = a_ptr + a_rows[None, :] * stride_am
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        a_base = a_ptr + a_rows[:, None] * stride_am
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if SWAP_AB:
            a = tl.load(a_base + offs_k[:, None], mask=slot_mask[None, :] & (offs_k < K)[:, None], other=0.0)
        else:
            a = tl.load(a_base + offs_k[None, :], mask=slot_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _mxfp4_tile(w_ptr, es_ptr, stride_bn, stride_sn, k0, K, offs_n, n_mask, BLOCK_K, BLOCK_N, SWAP_AB,
                        BF16_ASM)  # fmt: skip
        acc = _mac(acc, a, w, UPCAST, SWAP_AB)
        if GATED:
            up_rows = offs_n + N
            w_up = _mxfp4_tile(w_ptr, es_ptr, stride_bn, stride_sn, k0, K, up_rows, n_mask, BLOCK_K, BLOCK_N,
                               SWAP_AB, BF16_ASM)  # fmt: skip
            acc_up = _mac(acc_up, a, w_up, UPCAST, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)

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
