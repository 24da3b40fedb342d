"""Triton grouped GEMM for fused MoE (imported lazily: only this module imports triton).

One kernel serves both expert GEMMs. Program (pid_m, pid_n) takes block pid_m of the block alignment (up to
BLOCK_M slots of one expert) and output columns [pid_n * BLOCK_N, +BLOCK_N):

    C[slot, n] = sum_k A[slot // A_ROWS_PER_TOKEN, k] * B[expert, n, k]        (B row-major [E, N_out, K])

- GATED (the w13 GEMM): B rows n and n + N are the gate and up projections of intermediate column n; both
  tiles accumulate in float32 and the epilogue stores act(gate) * up, so silu_and_mul never touches memory.
  act: silu(x) = x * sigmoid(x); gelu_tanh(x) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)).
- MUL_ROUTED_WEIGHT (the w2 GEMM): the float32 accumulator is scaled by topk_weights[slot] before the store.
- HAS_BIAS (gpt-oss, experts/epilogue.py): the expert's bias row is added to the float32 accumulators first (the
  w13 GEMM: columns n and N + n of its [2N] row to the gate and up tiles; the w2 GEMM: column n of its [K] row), so
  before the activation and before the routing weight. ACTIVATION 2 is swigluoai (gpt-oss's clamped SwiGLU with the
  runtime `alpha` and `limit`), applied here; the other activations are finish_rows'. Without these flags the kernel
  compiles as before.
- Slots >= num_valid_slots are padding: never loaded, never stored. A block whose first slot is padding does
  nothing (batched slabs past their count), and programs past the padded length exit at once, so the grid can
  be sized for the worst case without a host synchronization.
The walk (program_tile, block_rows) and the epilogue (finish_rows) are triton_tiles.py's, shared with the fp8 and
4-bit twins of this kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_moe.experts.triton_tiles import block_rows, finish_rows, program_tile

ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1, "swigluoai": 2}


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b. IEEE: exact float32 products (fp32 inputs, and the CPU interpreter, whose bf16 dot is
    wrong in triton 3.9, gets inputs upcast to float32)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _swigluoai_and_mul(gate, up, alpha, limit):
    """(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit), in float32."""
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * gate * tl.sigmoid(alpha * gate)


@triton.jit
def fused_moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    topk_weights_ptr,
    bias_ptr,
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
    stride_bias_e,
    alpha,
    limit,
    A_ROWS_PER_TOKEN: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
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

    if HAS_BIAS:
        bias_row = bias_ptr + expert * stride_bias_e + offs_n  # [BN]; contiguous rows of [E, 2N] or [E, K]
        acc += tl.load(bias_row, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_row + N, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 2:
        acc = _swigluoai_and_mul(acc, acc_up, alpha, limit)
        finish_rows(acc, acc_up, c_ptr, stride_cm, stride_cn, slots, slot_mask, offs_n, n_mask, topk_weights_ptr,
                    False, 0, MUL_ROUTED_WEIGHT, ROUND=False)  # fmt: skip
    else:
        finish_rows(acc, acc_up, c_ptr, stride_cm, stride_cn, slots, slot_mask, offs_n, n_mask, topk_weights_ptr,
                    GATED, ACTIVATION, MUL_ROUTED_WEIGHT, ROUND=False)  # fmt: skip
