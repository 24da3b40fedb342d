"""Triton grouped GEMM for W4A16 fused MoE (imported lazily: this module imports triton).

The 4-bit twin of triton_kernels.py's `fused_moe_gemm_kernel`: the same block alignment walk (program (pid_m, pid_n)
takes block pid_m of the sorted slots, all of one expert, and output columns [pid_n * BLOCK_N, +BLOCK_N)), the same
GATED epilogue (act(gate) * up) and MUL_ROUTED_WEIGHT scaling, with B the expert's packed 4-bit weight
[E, K / 8, COLS] (experts/int4.py; COLS = 2N when GATED: gate columns n, up columns N + n) unpacked in registers by
the dense W4A16 kernel's `unpack_tile` (treadle_kernels), as that kernel does:

    C[slot, n] = sum_k A[slot // A_ROWS_PER_TOKEN, k] * (q[expert, k, n] - z[expert, g(k), n]) * s[expert, g(k), n]

Scales and zero points, two ways (host-chosen, as the dense kernel):
- PER_ROW 0: a K step lies inside one group (BLOCK_K divides the group size): the integers q - z (exact in a 16-bit
  float) go to `tl.dot` in A's dtype and the fp32 partial sum is scaled per output column; the spec's products,
  summed in another order;
- PER_ROW 1: act order (G_IDX: g(k) = g_idx[expert, k]) or a step straddling groups: each row's scale and zero point
  are gathered and the dequantized tile is rounded to A's dtype for the dot.
The product is rounded to C's dtype, as the spec's projection output is, before the activation (GATED) or the routing
weight (MUL_ROUTED_WEIGHT). UPCAST (the CPU interpreter, and fp32 A): fp32 operands, IEEE dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_kernels.ops.w4a16_linear_kernels import unpack_tile
from treadle_moe.experts.triton_tiles import block_rows, finish_rows, program_tile


@triton.jit
def _dequant_partial(a, w_ptr, s_ptr, z_ptr, g_ptr, cols, k, k0, offs_n, n_mask, offs_k, k_mask, group_size,
                     HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr, G_IDX: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EXPAND: tl.constexpr):  # fmt: skip
    """a [BM, BK] @ dequant(B)[k0 : k0 + BK, offs_n] for one expert's weight at w_ptr (row stride `cols`), fp32."""
    q = unpack_tile(w_ptr, cols, k, k0, offs_n, n_mask, BLOCK_K, BLOCK_N, EXPAND)
    if PER_ROW:
        if G_IDX:
            groups = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
        else:
            groups = offs_k // group_size
        at = groups.to(tl.int64)[:, None] * cols + offs_n[None, :]
        tile_mask = k_mask[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + at, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + at, mask=tile_mask, other=0).to(tl.int32)
        else:
            z = tl.full([BLOCK_K, BLOCK_N], 8, tl.int32)
        w = (q - z).to(tl.float32) * s
        if UPCAST:
            return tl.dot(a.to(tl.float32), w, input_precision="ieee")
        return tl.dot(a, w.to(a.dtype))
    at = (k0 // group_size).to(tl.int64) * cols + offs_n
    s = tl.load(s_ptr + at, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + at, mask=n_mask, other=0).to(tl.int32)
    else:
        z = tl.full([BLOCK_N], 8, tl.int32)
    w = q - z[None, :]  # exact small integers
    if UPCAST:
        part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:
        part = tl.dot(a, w.to(a.dtype))
    return part * s[None, :]


@triton.jit
def fused_moe_w4a16_gemm_kernel(
    a_ptr, b_ptr, s_ptr, z_ptr, g_ptr, c_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots, group_size,
    stride_am, stride_be, stride_se, stride_ge, stride_cm,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr, G_IDX: tl.constexpr,
    UPCAST: tl.constexpr, EXPAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, live = program_tile(num_tokens_post_padded_ptr, N, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    slots, slot_mask, expert, a_rows, live = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_slots,
                                                        A_ROWS_PER_TOKEN, BLOCK_M)  # fmt: skip
    if not live:
        return

    cols = 2 * N if GATED else N  # the weight's columns: its row stride
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_ptr = b_ptr + expert * stride_be
    es_ptr = s_ptr + expert * stride_se
    ez_ptr = z_ptr + expert * stride_se
    eg_ptr = g_ptr + expert * stride_ge
    a_base = a_ptr + a_rows[:, None] * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = step * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_base + offs_k[None, :], mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
        acc += _dequant_partial(a, w_ptr, es_ptr, ez_ptr, eg_ptr, cols, K, k0, offs_n, n_mask, offs_k, k_mask,
                                group_size, HAS_ZEROS, PER_ROW, G_IDX, UPCAST, BLOCK_K, BLOCK_N, EXPAND)  # fmt: skip
        if GATED:
            acc_up += _dequant_partial(a, w_ptr, es_ptr, ez_ptr, eg_ptr, cols, K, k0, offs_n + N, n_mask, offs_k,
                                       k_mask, group_size, HAS_ZEROS, PER_ROW, G_IDX, UPCAST, BLOCK_K, BLOCK_N,
                                       EXPAND)  # fmt: skip

    # the projection's output rounded as the spec's (ROUND), then act(gate) * up, the routing weight, the store
    finish_rows(acc, acc_up, c_ptr, stride_cm, 1, slots, slot_mask, offs_n, n_mask, topk_weights_ptr, GATED,
                ACTIVATION, MUL_ROUTED_WEIGHT, ROUND=True)  # fmt: skip
