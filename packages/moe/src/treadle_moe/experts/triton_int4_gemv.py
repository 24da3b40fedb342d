"""Small-batch W4A16 fused MoE: a GEMV kernel without tensor cores (imported lazily: this module imports triton).

At decode an expert gets one to a few slots, so `tl.dot` tiles of BLOCK_M >= 16 rows are mostly padding and the
4-bit unpack dominates; the work is streaming the experts' packed weights once. Program (pid_m, pid_n) takes block
pid_m of the block alignment (its slots are a prefix of the block, then padding; experts/align.py) and output columns
[pid_n * BLOCK_N, +BLOCK_N), and walks the block's valid slots BLOCK_M (1..8) at a time, each time looping over K:

    C[slot, n] = sum_k A[slot // A_ROWS_PER_TOKEN, k] * (q[expert, k, n] - z[expert, g(k), n]) * s[expert, g(k), n]

A K step loads a tile of int32 words [GROUPS, WORDS, BLOCK_N] (GROUPS groups of WORDS words = BLOCK_K rows) and
unpacks each word's eight nibbles with two bit operations a nibble: nibble j < 4 is `word & (0xF << 4j)`, nibble
4 + j the same on `word >> 16`; OR-ed into the exponent of 2^23 and read as fp32, minus 2^23, that is exactly
q * 16^j, so the activation it meets is pre-scaled by 16^-j (an exact power of two) instead of shifting every nibble.
The products sum in fp32 with broadcast FMAs over the nibble axis, per word; a word lies in one group, so
(PER_ROW 0) the zero point and scale apply per word and group: s * (sum a q - z * sum a), with s and z loaded once
per group [GROUPS, BLOCK_N] and broadcast. The per-word fp32 partials accumulate over the K loop and are reduced
(tl.sum) once per BLOCK_M rows. PER_ROW 1 (act order: g(k) = g_idx[expert, k]; or groups that do not tile a step)
gathers each row's scale and zero point and dequantizes every element instead.
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
    """BLOCK_M: the power of two at or above the mean slots an expert gets (capped at 4; a block's extra rows loop),
    so the common decode case (under one slot an expert) wastes no FMA; BLOCK_K 128 (one Qwen3 group) or K's."""
    mean = -(-num_slots // max(num_experts, 1))
    block_m = min(4, triton.next_power_of_2(max(mean, 1)))
    return GemvConfig(
        block_m=block_m, block_n=32, block_k=min(128, max(8, triton.next_power_of_2(k))), num_warps=4
    )


@triton.jit
def _load_words(w_ptr, cols, k_words, word0, offs_n, n_mask, GROUPS: tl.constexpr, WORDS: tl.constexpr):
    """int32 words [GROUPS, WORDS, BN] of word rows word0 + (g * WORDS + w) (0 past k_words or n)."""
    rows = word0 + tl.arange(0, GROUPS)[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
    mask = (rows < k_words)[:, :, None] & n_mask[None, None, :]
    return tl.load(w_ptr + rows.to(tl.int64)[:, :, None] * cols + offs_n[None, None, :], mask=mask, other=0)


@triton.jit
def _nibbles(words):
    """words [G, W, BN] -> (lo, hi) fp32 [G, W, 4, BN]: nibble j and nibble 4 + j of each word, times 16^j."""
    masks = (0xF << (tl.arange(0, 4) * 4))[None, None, :, None]
    lo = (words[:, :, None, :] & masks) | _MAGIC
    hi = ((words >> 16)[:, :, None, :] & masks) | _MAGIC
    return lo.to(tl.float32, bitcast=True) - 8388608.0, hi.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _row_groups(g_ptr, k_rows, K, group_size, G_IDX: tl.constexpr):
    """The group of each input row k_rows (any shape; 0 past K)."""
    if G_IDX:
        return tl.load(g_ptr + k_rows, mask=k_rows < K, other=0).to(tl.int64)
    return (k_rows // group_size).to(tl.int64)


@triton.jit
def _step(acc, a_lo, a_hi, a_sum, w_ptr, s_ptr, z_ptr, g_ptr, cols, K, word0, k_lo, offs_n, n_mask, group_size,
          HAS_ZEROS: tl.constexpr, PER_ROW: tl.constexpr, G_IDX: tl.constexpr, GROUPS: tl.constexpr,
          WORDS: tl.constexpr):  # fmt: skip
    """acc [BM, G, W, BN] += one K step's per-word partial sums of columns offs_n (module docstring)."""
    lo, hi = _nibbles(_load_words(w_ptr, cols, K // 8, word0, offs_n, n_mask, GROUPS, WORDS))
    if PER_ROW:
        # every row's own group: dequantize each element, (q - z) 16^j = lo - z 16^j
        k_hi = k_lo + 4
        tile_mask = (k_lo < K)[:, :, :, None] & n_mask[None, None, None, :]
        at_lo = (
            _row_groups(g_ptr, k_lo, K, group_size, G_IDX)[:, :, :, None] * cols + offs_n[None, None, None, :]
        )
        at_hi = (
            _row_groups(g_ptr, k_hi, K, group_size, G_IDX)[:, :, :, None] * cols + offs_n[None, None, None, :]
        )
        unit = (1 << (tl.arange(0, 4) * 4)).to(tl.float32)[None, None, :, None]
        if HAS_ZEROS:
            lo = lo - tl.load(z_ptr + at_lo, mask=tile_mask, other=0).to(tl.float32) * unit
            hi = hi - tl.load(z_ptr + at_hi, mask=tile_mask, other=0).to(tl.float32) * unit
        else:
            lo = lo - 8.0 * unit
            hi = hi - 8.0 * unit
        w_lo = lo * tl.load(s_ptr + at_lo, mask=tile_mask, other=0.0).to(tl.float32)
        w_hi = hi * tl.load(s_ptr + at_hi, mask=tile_mask, other=0.0).to(tl.float32)
        return acc + tl.sum(a_lo[:, :, :, :, None] * w_lo[None] + a_hi[:, :, :, :, None] * w_hi[None], axis=3)
    # a word lies in one group: scale and zero point per (group in step, column), broadcast over its words;
    # part [BM, G, W, BN] is each word's sum of a q, first_rows [G] each group's first input row
    part = tl.sum(a_lo[:, :, :, :, None] * lo[None] + a_hi[:, :, :, :, None] * hi[None], axis=3)
    first_rows = 8 * (word0 + tl.arange(0, GROUPS) * WORDS)
    group_mask = (first_rows < K)[:, None] & n_mask[None, :]
    # [G, BN]
    at = (first_rows // group_size).to(tl.int64)[:, None] * cols + offs_n[None, :]
    s = tl.load(s_ptr + at, mask=group_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + at, mask=group_mask, other=0).to(tl.float32)
        part = part - z[None, :, None, :] * a_sum[:, :, :, None]
    else:
        part = part - 8.0 * a_sum[:, :, :, None]
    return acc + part * s[None, :, None, :]


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
    # input row of (group in step g, word w, nibble j) of a step, before its offset: 8 (g W + w) + j, j < 4
    k_in_step = (8 * (tl.arange(0, GROUPS)[:, None, None] * WORDS + tl.arange(0, WORDS)[None, :, None])
                 + tl.arange(0, 4)[None, None, :])  # fmt: skip
    # 16^-j, exact
    inv_unit = 1.0 / (1 << (tl.arange(0, 4) * 4)).to(tl.float32)

    for r0 in range(0, num_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        slots = tl.load(block + rows, mask=row_mask, other=num_valid_slots)
        slot_mask = slots < num_valid_slots
        # [BM] row starts
        a_rows = a_ptr + (slots // A_ROWS_PER_TOKEN).to(tl.int64) * stride_am
        acc = tl.zeros((BLOCK_M, GROUPS, WORDS, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, GROUPS, WORDS, BLOCK_N), dtype=tl.float32)
        for word0 in range(0, tl.cdiv(K, 8), GROUPS * WORDS):
            # [G, W, 4] rows of nibbles 0..3; nibbles 4..7 are 4 rows further
            k_lo = 8 * word0 + k_in_step
            a_mask = slot_mask[:, None, None, None] & (k_lo < K)[None]
            a_at = a_rows[:, None, None, None] + k_lo[None]
            # [BM, G, W, 4]
            a_lo = tl.load(a_at, mask=a_mask, other=0.0).to(tl.float32)
            a_hi = tl.load(a_at + 4, mask=a_mask, other=0.0).to(tl.float32)
            # [BM, G, W]: each word's activations, for its zero point
            a_sum = tl.sum(a_lo + a_hi, axis=3)
            a_lo = a_lo * inv_unit[None, None, None, :]
            a_hi = a_hi * inv_unit[None, None, None, :]
            acc = _step(acc, a_lo, a_hi, a_sum, w_ptr, es_ptr, ez_ptr, eg_ptr, cols, K, word0, k_lo, offs_n,
                        n_mask, group_size, HAS_ZEROS, PER_ROW, G_IDX, GROUPS, WORDS)  # fmt: skip
            if GATED:
                acc_up = _step(acc_up, a_lo, a_hi, a_sum, w_ptr, es_ptr, ez_ptr, eg_ptr, cols, K, word0, k_lo,
                               offs_n + N, n_mask, group_size, HAS_ZEROS, PER_ROW, G_IDX, GROUPS,
                               WORDS)  # fmt: skip
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
