"""Triton grouped GEMM for fused MoE (imported lazily: only this module imports triton).

One kernel serves both expert GEMMs. Program (pid_m, pid_n) takes block pid_m of the block alignment (up to
BLOCK_M slots of one expert) and output columns [pid_n * BLOCK_N, +BLOCK_N):

    C[slot, n] = sum_k A[slot // A_ROWS_PER_TOKEN, k] * B[expert, n, k]        (B row-major [E, N_out, K])

- GATED (the w13 GEMM): B rows n and n + N are the gate and up projections of intermediate column n; both
  tiles accumulate in float32 and the epilogue stores act(gate) * up, so silu_and_mul never touches memory.
  act: silu(x) = x * sigmoid(x); gelu_tanh(x) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)).
- MUL_ROUTED_WEIGHT (the w2 GEMM): the float32 accumulator is scaled by topk_weights[slot] before the store.
- Slots >= num_valid_slots are padding: never loaded, never stored. A block whose first slot is padding does
  nothing (batched slabs past their count), and programs past the padded length exit at once, so the grid can
  be sized for the worst case without a host synchronization.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b. IEEE: exact float32 products (fp32 inputs, and the CPU interpreter, whose bf16 dot is
    wrong in triton 3.9, gets inputs upcast to float32)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def fused_moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    topk_weights_ptr,
    sorted_token_ids_ptr,
    expert_ids_ptr,
    num_tokens_post_padded_ptr,
    N,
    K,
    num_valid_slots,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROWS_PER_TOKEN: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_post_padded = tl.load(num_tokens_post_padded_ptr)
    num_pid_m = tl.cdiv(num_post_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if pid >= num_pid_m * num_pid_n:
        return
    # Grouped ordering: GROUP_M consecutive row blocks share the sweep over column blocks.
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
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = (
        b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    )  # [BK, BN]
    up_offset = N * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=slot_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, IEEE)
        if GATED:
            if EVEN_K:
                b_up = tl.load(b_ptrs + up_offset, mask=n_mask[None, :], other=0.0)
            else:
                b_up = tl.load(b_ptrs + up_offset, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = _mma(a, b_up, acc_up, IEEE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        if ACTIVATION == 0:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            inner = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(inner) * acc_up
    if MUL_ROUTED_WEIGHT:
        weights = tl.load(topk_weights_ptr + slots, mask=slot_mask, other=0.0)
        acc = acc * weights[:, None].to(tl.float32)
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])
