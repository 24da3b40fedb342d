"""Small-batch W4A16 fused MoE: a GEMV kernel without tensor cores (imported lazily: this module imports triton).

At decode an expert gets one to a few slots, so `tl.dot` tiles of BLOCK_M >= 16 rows are mostly padding and the
4-bit unpack dominates; the work is streaming the experts' packed weights once. Program (pid_m, pid_n) takes block
pid_m of the block alignment (its slots are a prefix of the block, then padding; experts/align.py) and output columns
[pid_n * BLOCK_N, +BLOCK_N), and walks the block's valid slots BLOCK_M (1..8) at a time, each time looping over K:

    C[slot, n] = sum_k A[slot // A_ROWS_PER_TOKEN, k] * (q[expert, k, n] - z[expert, g(k), n]) * s[expert, g(k), n]

A K step loads a tile of int32 words [1, GROUPS, WORDS, BLOCK_N] (GROUPS groups of WORDS words = BLOCK_K rows) and
takes its eight nibble planes apart with one integer op each: plane j is `(word & 0xF << 4 (j % 4)) | 0x4B000000`
(`word >> 16` instead of `word` for j >= 4, one shift a word), whose bits read as fp32 are 2^23 + q 16^(j % 4)
exactly; one fp32 subtraction leaves q 16^(j % 4), and plane j's activations [BLOCK_M, GROUPS, WORDS] are pre-scaled
by 16^-(j % 4) (a power of two: exact), so no per-nibble shift or int-to-float conversion runs. Each plane is one
broadcast FMA into a per-word fp32 tile [BLOCK_M, GROUPS, WORDS, BLOCK_N]. A word lies in one group, so (PER_ROW 0)
the zero point and scale apply per group: s (sum a q - z sum a), s and z loaded once per group and column
[1, GROUPS, 1, BLOCK_N] and broadcast over the group's words (no per-element scale load). The per-word partials
accumulate over the K loop and are reduced (tl.sum) once per BLOCK_M slots. PER_ROW 1 (act order: g(k) =
g_idx[expert, k]; or groups that do not tile a step) gathers each row's scale and zero point and dequantizes every
element instead. Every tile is made in the accumulator's 4-D shape, so the K loop has no layout conversion.
Compiled for sm_90 (Triton 3.9, `gemv_config`'s tiles; not timed): the gated GEMM takes 95 registers a thread at one
slot (116 with zero points, 96 act order), 92-95 at two, 145-204 at four, no spills; the K loop runs ~6 instructions
a weight (one AND-OR, one subtraction, one FMA a slot; the rest loads and addresses) and no layout conversion.
The epilogue is triton_tiles.py's `finish_rows` with ROUND, as the dot kernel (triton_int4_kernels.py): the
projection's output rounded to C's dtype, act(gate) * up (GATED; up columns N + n), the routing weight, the store.
Numerics: the spec's exact fp32 products (a 16-bit activation times a 4-bit integer), summed in another order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from treadle_ir.ops.int4 import INT4_PACK
from treadle_moe.experts.align import BlockAlignment
from treadle_moe.experts.int4 import Int4Layout
from treadle_moe.experts.triton_tiles import finish_rows, program_tile

__all__ = ["GemvConfig", "gemv_config", "invoke_moe_w4a16_gemv"]

# the bits of fp32 2^23: OR-ed with an integer below 2^23 it reads as 2^23 + that integer
_MAGIC = tl.constexpr(0x4B000000)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """Tiles of the GEMV kernel."""

    block_m: int  # slots multiplied at once (a power of two, 1..8), from one alignment block
    block_n: int  # output columns per program (a power of two)
    block_k: int  # input rows per K step (a power of two, >= 8: whole int32 words)
    num_warps: int


def gemv_config(num_slots: int, num_experts: int, k: int) -> GemvConfig:
    """BLOCK_M: the power of two at or above the mean slots an expert gets (capped at 4; a block's extra slots loop),
    so the common decode case (under one slot an expert) wastes no FMA. BLOCK_K: 256 rows at one slot (the grid is
    under one wave at decode and these loads are not software-pipelined, so a program's step is what it has in
    flight: 4 KB of words a projection), 128 from two slots (the accumulator grows with them); K's own size when
    neither divides it. BLOCK_N 32: 24 column tiles of Qwen3-30B-A3B's 768-column w13, 64 of its w2."""
    mean = -(-num_slots // max(num_experts, 1))
    block_m = min(4, triton.next_power_of_2(max(mean, 1)))
    step = 256 if block_m == 1 else 128
    block_k = step if k % step == 0 else min(128, max(8, triton.next_power_of_2(k)))
    return GemvConfig(block_m=block_m, block_n=32, block_k=block_k, num_warps=4)


@triton.jit
def _plane(words, high, J: tl.constexpr):
    """Nibble J of every word as fp32 q * 16^(J % 4), exact: one AND-OR into 2^23's bits, one subtraction."""
    src = words if J < 4 else high
    bits = (src & (0xF << (4 * (J % 4)))) | _MAGIC
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _step(acc, a_rows, slot_mask, w_ptr, s_ptr, z_ptr, g_ptr, cols, K, word_rows, group_words, offs_n, n_mask,
          group_size, HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr, G_IDX: tl.constexpr):  # fmt: skip
    """acc [BM, G, W, BN] += one K step's products of the word rows word_rows [G, W] (group g's first: group_words
    [G, 1]) and columns offs_n, per word (module docstring); every tile is made in the accumulator's 4-D shape."""
    w_mask = word_rows < K // 8
    tile_mask = w_mask[None, :, :, None] & n_mask[None, None, None, :]
    # [1, G, W, BN]
    words = tl.load(w_ptr + word_rows.to(tl.int64)[None, :, :, None] * cols + offs_n[None, None, None, :],
                    mask=tile_mask, other=0)  # fmt: skip
    high = words >> 16
    a_mask = slot_mask[:, None, None] & w_mask[None, :, :]
    if PER_ROW:
        for j in tl.static_range(8):
            rows = word_rows * 8 + j
            # [BM, G, W], pre-scaled by 16^-(j % 4)
            a = tl.load(a_rows[:, None, None] + rows[None, :, :], mask=a_mask, other=0.0).to(tl.float32)
            a = a * (1.0 / (1 << (4 * (j % 4))))
            if G_IDX:
                groups = tl.load(g_ptr + rows, mask=w_mask, other=0)
            else:
                groups = rows // group_size
            at = groups.to(tl.int64)[None, :, :, None] * cols + offs_n[None, None, None, :]
            if HAS_ZEROS:
                z = tl.load(z_ptr + at, mask=tile_mask, other=0).to(tl.float32)
            else:
                z = 8.0
            scale = tl.load(s_ptr + at, mask=tile_mask, other=0.0).to(tl.float32)
            acc += a[:, :, :, None] * ((_plane(words, high, j) - z * (1 << (4 * (j % 4)))) * scale)
    else:
        # a word lies in one group: s (sum a q - z sum a), the scale and zero point of [1, G, 1, BN] broadcast over
        # the group's words
        part = tl.zeros(acc.shape, dtype=tl.float32)
        a_sum = tl.zeros(a_mask.shape, dtype=tl.float32)
        for j in tl.static_range(8):
            a_at = a_rows[:, None, None] + (word_rows * 8 + j)[None, :, :]
            a = tl.load(a_at, mask=a_mask, other=0.0).to(tl.float32)
            a_sum += a
            part += (a * (1.0 / (1 << (4 * (j % 4)))))[:, :, :, None] * _plane(words, high, j)
        # [1, G, 1, BN]
        at = (group_words * 8 // group_size).to(tl.int64)[None, :, :, None] * cols + offs_n[
            None, None, None, :
        ]
        group_mask = (group_words < K // 8)[None, :, :, None] & n_mask[None, None, None, :]
        s = tl.load(s_ptr + at, mask=group_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + at, mask=group_mask, other=0).to(tl.float32)
            part -= z * a_sum[:, :, :, None]
        else:
            part -= 8.0 * a_sum[:, :, :, None]
        acc += part * s
    return acc


@triton.jit
def fused_moe_w4a16_gemv_kernel(
    a_ptr, b_ptr, s_ptr, z_ptr, g_ptr, c_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, num_valid_slots, group_size,
    stride_am, stride_be, stride_se, stride_ge, stride_cm,
    A_ROWS_PER_TOKEN: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr, G_IDX: tl.constexpr,
    ALIGN_M: tl.constexpr, ALIGN_P2: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, live = program_tile(num_tokens_post_padded_ptr, N, ALIGN_M, BLOCK_N, 1)
    if not live:
        return
    block = sorted_token_ids_ptr + pid_m * ALIGN_M
    rows_in_block = tl.arange(0, ALIGN_P2)
    block_slots = tl.load(block + rows_in_block, mask=rows_in_block < ALIGN_M, other=num_valid_slots)
    # the valid slots: a prefix of the block
    num_rows = tl.sum((block_slots < num_valid_slots).to(tl.int32))
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    # the weight's columns: its row stride
    cols = 2 * N if GATED else N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_ptr = b_ptr + expert * stride_be
    es_ptr = s_ptr + expert * stride_se
    ez_ptr = z_ptr + expert * stride_se
    eg_ptr = g_ptr + expert * stride_ge
    # [G, W]: a step's word rows before its offset, group g's words first
    step_groups = tl.arange(0, GROUPS)[:, None] * WORDS
    step_words = step_groups + tl.arange(0, WORDS)[None, :]

    for r0 in range(0, num_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        slots = tl.load(block + rows, mask=rows < num_rows, other=num_valid_slots)
        slot_mask = slots < num_valid_slots
        # [BM] row starts
        a_rows = a_ptr + (slots // A_ROWS_PER_TOKEN).to(tl.int64) * stride_am
        acc = tl.zeros((BLOCK_M, GROUPS, WORDS, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, GROUPS, WORDS, BLOCK_N), dtype=tl.float32)
        for word0 in range(0, tl.cdiv(K, 8), GROUPS * WORDS):
            word_rows = word0 + step_words
            group_words = word0 + step_groups
            acc = _step(acc, a_rows, slot_mask, w_ptr, es_ptr, ez_ptr, eg_ptr, cols, K, word_rows, group_words,
                        offs_n, n_mask, group_size, HAS_ZEROS, PER_ROW, G_IDX)  # fmt: skip
            if GATED:
                acc_up = _step(acc_up, a_rows, slot_mask, w_ptr, es_ptr, ez_ptr, eg_ptr, cols, K, word_rows,
                               group_words, offs_n + N, n_mask, group_size, HAS_ZEROS, PER_ROW, G_IDX)  # fmt: skip
        # [BM, BN]
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        out_up = tl.sum(tl.sum(acc_up, axis=2), axis=1)
        finish_rows(out, out_up, c_ptr, stride_cm, 1, slots, slot_mask, offs_n, n_mask, topk_weights_ptr, GATED,
                    ACTIVATION, MUL_ROUTED_WEIGHT, ROUND=True)  # fmt: skip


def _group_tiling(layout: Int4Layout, group_size: int, k: int, block_k: int) -> tuple[bool, int, int]:
    """(PER_ROW, GROUPS, WORDS) for a K step of block_k rows: groups tile the step when each is whole words and a
    power of two (or one group spans K); act order and other sizes gather each row's group (PER_ROW)."""
    words = block_k // INT4_PACK
    if layout.act_order:
        return True, 1, words
    if group_size >= k or (group_size % block_k == 0):
        return False, 1, words
    if group_size % INT4_PACK == 0 and group_size & (group_size - 1) == 0:
        return False, block_k // group_size, group_size // INT4_PACK
    return True, 1, words


def invoke_moe_w4a16_gemv(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    c: torch.Tensor,
    topk_weights: torch.Tensor | None,
    alignment: BlockAlignment,
    config: GemvConfig,
    layout: Int4Layout,
    *,
    a_rows_per_token: int,
    gated: bool,
    activation: str = "silu",
) -> None:
    """As triton_int4.py's `invoke_moe_w4a16_gemm` (same operands and result), by the GEMV kernel; the alignment
    may be built for any BLOCK_M (its blocks are walked config.block_m slots at a time)."""
    from treadle_moe.experts.triton_kernels import ACTIVATION_CODES

    assert a.stride(1) == 1 and c.stride(1) == 1, "rows of a and c must be contiguous"
    assert b.is_contiguous() and scale.is_contiguous(), "packed weights and scales are contiguous"
    cols = b.shape[2]
    n_out = cols // 2 if gated else cols
    k = b.shape[1] * INT4_PACK
    group_size = layout.group_size_of(k)
    per_row, groups, words = _group_tiling(layout, group_size, k, config.block_k)
    # unused pointer when not multiplying
    weights = topk_weights if topk_weights is not None else scale
    grid = (alignment.num_blocks * triton.cdiv(n_out, config.block_n),)
    fused_moe_w4a16_gemv_kernel[grid](
        a, b, scale, zero if zero is not None else b, g_idx if g_idx is not None else b, c, weights,
        alignment.sorted_token_ids, alignment.expert_ids, alignment.num_tokens_post_padded, n_out, k,
        alignment.num_slots, group_size, a.stride(0), b.stride(0), scale.stride(0),
        g_idx.stride(0) if g_idx is not None else 0, c.stride(0),
        A_ROWS_PER_TOKEN=a_rows_per_token, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
        MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_ZEROS=zero is not None, PER_ROW=per_row,
        G_IDX=g_idx is not None, ALIGN_M=alignment.block_m, ALIGN_P2=triton.next_power_of_2(alignment.block_m),
        GROUPS=groups, WORDS=words, BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
    )  # fmt: skip
