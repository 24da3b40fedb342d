"""The block-alignment walk and the epilogue shared by the fused-MoE GEMM kernels (bf16 triton_kernels.py, fp8
triton_fp8_kernels.py, 4-bit triton_int4_kernels.py); imported lazily with them (this module imports triton).

A program takes one (pid_m, pid_n) tile: block pid_m of the sorted slots (up to BLOCK_M slots, all routed to one
expert; experts/align.py) and output columns [pid_n * BLOCK_N, +BLOCK_N). Programs are ordered in groups of GROUP_M
row blocks that sweep the column blocks together (L2 reuse of A). The grid is sized for the worst case without a
host synchronization, so `program_tile` reports whether the program has a tile at all (`live`), and a block whose
first slot is padding (batched slabs past their count) does nothing (`block_rows`'s `live`).

The epilogue (`finish_rows`): optionally the projection's output rounded to C's dtype first (ROUND: the quantized
kernels, as their spec's projection output is), act(gate) * up when GATED (act: silu(x) = x * sigmoid(x); gelu_tanh(x)
= x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))), times the routing weight when MUL_ROUTED_WEIGHT, stored to
C's rows `slots`; padding slots are never stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_tile(num_tokens_post_padded_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):  # fmt: skip
    """This program's (pid_m, pid_n) and whether it has a tile (programs past the padded length have none)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(tl.load(num_tokens_post_padded_ptr), BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.maximum(tl.minimum(num_pid_m - first_pid_m, GROUP_M), 1)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n, pid < num_pid_m * num_pid_n


@triton.jit
def block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_slots, A_ROWS_PER_TOKEN: tl.constexpr,
               BLOCK_M: tl.constexpr):  # fmt: skip
    """Block pid_m's slots [BLOCK_M] (int32), their mask, its expert (int64), the rows of A they read (int64) and
    whether the block holds any slot."""
    live = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M) < num_valid_slots
    slots = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_mask = slots < num_valid_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    return slots, slot_mask, expert, (slots // A_ROWS_PER_TOKEN).to(tl.int64), live


@triton.jit
def finish_rows(acc, acc_up, c_ptr, stride_cm, stride_cn, slots, slot_mask, offs_n, n_mask, topk_weights_ptr,
                GATED: tl.constexpr, ACTIVATION: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
                ROUND: tl.constexpr):  # fmt: skip
    """The epilogue of the module docstring: fp32 acc (and acc_up) -> C[slots, offs_n]."""
    out_ty = c_ptr.dtype.element_ty
    if ROUND:
        acc = acc.to(out_ty).to(tl.float32)
    if GATED:
        if ROUND:
            acc_up = acc_up.to(out_ty).to(tl.float32)
        if ACTIVATION == 0:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            inner = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(inner) * acc_up
    if MUL_ROUTED_WEIGHT:
        weights = tl.load(topk_weights_ptr + slots, mask=slot_mask, other=0.0)
        acc = acc * weights[:, None].to(tl.float32)
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(out_ty), mask=slot_mask[:, None] & n_mask[None, :])
