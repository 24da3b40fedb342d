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
    pid = tl.program_id(0)
    num_post_padded = tl.load(num_tokens_post_padded_ptr)
    num_pid_m = tl.cdiv(num_post_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if pid >= num_pid_m * num_pid_n:
        return
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    first_slot = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M)
    if first_slot >= num_valid_slots:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_token_ids_ptr + offs_m)  # [BLOCK_M] int32
    slot_mask = slots < num_valid_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    a_rows = (slots // A_ROWS_PER_TOKEN).to(tl.int64)

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
    out_ty = c_ptr.dtype.element_ty
    acc = acc.to(out_ty).to(tl.float32)  # the projection's output, rounded as the spec's
    if GATED:
        acc_up = acc_up.to(out_ty).to(tl.float32)
        if ACTIVATION == 0:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            inner = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(inner) * acc_up
    if MUL_ROUTED_WEIGHT:
        weights = tl.load(topk_weights_ptr + slots, mask=slot_mask, other=0.0)
        acc = acc * weights[:, None].to(tl.float32)
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(out_ty), mask=slot_mask[:, None] & n_mask[None, :])
