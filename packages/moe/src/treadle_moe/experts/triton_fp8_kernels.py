"""Triton grouped GEMM for fp8 fused MoE (imported lazily: this module imports triton).

The fp8 twin of triton_kernels.py's `fused_moe_gemm_kernel`: the same block alignment walk (program (pid_m, pid_n)
takes block pid_m of the sorted slots, all of one expert, and output columns [pid_n * BLOCK_N, +BLOCK_N)), the same
GATED epilogue (act(gate) * up) and MUL_ROUTED_WEIGHT scaling, with fp8 operands on the tensor cores:

    C[slot, n] = sum_k qA[slot // A_ROWS_PER_TOKEN, k] * qB[expert, n, k]   (scaled, see below)

A is float8_e4m3fn, already quantized (per row, or per (row, group_k group)), with fp32 scales a_scale; B the
expert's float8_e4m3fn weight [E, N_out, K] (row n + N is the up projection's row n when GATED) with scales
b_scale. Every K step's `tl.dot` starts a fresh fp32 partial sum that is then added to the accumulator, so
Hopper's reduced-precision fp8 accumulation never runs longer than BLOCK_K products.
- per channel (BLOCK_SCALED False): acc = sum of the partials; the epilogue applies (acc * a_scale[row]) *
  b_scale[expert, n], the order of `ops.fp8_linear`.
- block-wise (BLOCK_SCALED True): each partial is scaled by its rows' group scale a_scale[row, kb] and the weight
  tile's b_scale[expert, n // group_n, kb] before joining the accumulator (kb = k // group_k; BLOCK_K divides
  group_k, so a K step never straddles two groups). The up rows' tiles start UP_SCALE_ROWS scale rows further.
The product is then rounded to C's dtype, as the spec's projection output is, before the activation (GATED) or the
routing weight (MUL_ROUTED_WEIGHT). UPCAST (the CPU interpreter, which has no fp8 dot): fp32 operands, IEEE dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_moe.experts.triton_tiles import block_rows, finish_rows, program_tile


@triton.jit
def _partial(a, b, UPCAST: tl.constexpr):
    """a [BM, BK] @ b [BN, BK]^T in a fresh fp32 accumulator."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b))


@triton.jit
def fused_moe_fp8_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots, group_n, group_k, up_scale_rows,
    stride_am, stride_as, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, BLOCK_SCALED: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
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
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_rows = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
    b_ptrs = b_rows + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    up_offset = N * stride_bn
    a_scales = a_scale_ptr + a_rows * stride_as  # [BLOCK_M]
    if BLOCK_SCALED:
        b_scales = b_scale_ptr + expert * stride_bse + (offs_n // group_n) * stride_bsn  # [BLOCK_N] tile rows
    else:
        b_scales = b_scale_ptr + expert * stride_bse + offs_n * stride_bsn  # [BLOCK_N] output rows
    up_scales = b_scales + up_scale_rows * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a_mask = slot_mask[:, None]
            b_mask = n_mask[:, None]
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a_mask = slot_mask[:, None] & k_mask[None, :]
            b_mask = n_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        partial = _partial(a, tl.load(b_ptrs, mask=b_mask, other=0.0), UPCAST)
        if GATED:
            partial_up = _partial(a, tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0), UPCAST)
        if BLOCK_SCALED:
            kb = (k * BLOCK_K) // group_k
            a_s = tl.load(a_scales + kb, mask=slot_mask, other=0.0)[:, None]
            acc += partial * a_s * tl.load(b_scales + kb, mask=n_mask, other=0.0)[None, :]
            if GATED:
                acc_up += partial_up * a_s * tl.load(up_scales + kb, mask=n_mask, other=0.0)[None, :]
        else:
            acc += partial
            if GATED:
                acc_up += partial_up
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if not BLOCK_SCALED:
        a_s = tl.load(a_scales, mask=slot_mask, other=0.0)[:, None]
        acc = acc * a_s * tl.load(b_scales, mask=n_mask, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * a_s * tl.load(up_scales, mask=n_mask, other=0.0)[None, :]
    # the projection's output rounded as the spec's (ROUND), then act(gate) * up, the routing weight, the store
    finish_rows(acc, acc_up, c_ptr, stride_cm, 1, slots, slot_mask, offs_n, n_mask, topk_weights_ptr, GATED,
                ACTIVATION, MUL_ROUTED_WEIGHT, ROUND=True)  # fmt: skip
