"""Triton kernels for ``token_logprobs`` in two stages (imported lazily: this module imports triton).

Stage 1, grid (rows, chunks): each program reads ``CHUNK`` logits of one row once and writes the chunk's maximum,
its sum of ``exp(x - max)``, how many of its logits are >= the row's token's logit, and its ``TOP`` largest
logits as (order key, index), largest first, the lower index first among equal keys. Stage 2, grid (rows,):
one program per row merges the chunks' (max, sum) into the log-sum-exp, adds the counts into the rank, and picks
the row's ``TOP`` largest among the chunks' candidates (chunks in column order, so among equal keys the lower
index again). Keys are ``argmax_rows``'s int32 order keys, so that a taken or masked lane can sit below -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sampling_kernels import KEY_BELOW_ALL, _order_key


@triton.jit
def _key_value(key):
    """The fp32 number an order key stands for (-0.0 comes back as 0.0)."""
    magnitude = tl.where(key < 0, -key, key).to(tl.float32, bitcast=True)
    return tl.where(key < 0, -magnitude, magnitude)


@triton.jit
def logprobs_chunks_kernel(
    logits_ptr,
    logits_row_stride,
    vocab_size,
    token_ids_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_count_ptr,
    part_key_ptr,
    part_index_ptr,
    CHUNK: tl.constexpr,
    TOP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lanes = tl.arange(0, CHUNK)
    cols = chunk * CHUNK + lanes
    mask = cols < vocab_size
    row_logits = logits_ptr + row * logits_row_stride
    x = tl.load(row_logits + cols, mask=mask, other=float("-inf")).to(tl.float32)
    chosen = tl.load(row_logits + tl.load(token_ids_ptr + row)).to(tl.float32)
    high = tl.max(x, axis=0)
    shift = tl.where(high == float("-inf"), 0.0, high)  # a chunk of -inf sums to 0, not NaN
    slot = row * tl.num_programs(1) + chunk  # partials are [rows, chunks], contiguous
    tl.store(part_max_ptr + slot, high)
    tl.store(part_sum_ptr + slot, tl.sum(tl.exp(x - shift), axis=0))
    tl.store(part_count_ptr + slot, tl.sum((mask & (x >= chosen)).to(tl.int32), axis=0))
    if TOP > 0:
        key = tl.where(mask, _order_key(x), KEY_BELOW_ALL)
        for j in tl.static_range(TOP):
            best_key, best = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(part_key_ptr + slot * TOP + j, best_key)
            tl.store(part_index_ptr + slot * TOP + j, chunk * CHUNK + best)
            key = tl.where(lanes == best, KEY_BELOW_ALL, key)


@triton.jit
def logprobs_reduce_kernel(
    logits_ptr,
    logits_row_stride,
    token_ids_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_count_ptr,
    part_key_ptr,
    part_index_ptr,
    num_chunks,
    num_top,
    ids_ptr,
    values_ptr,
    ranks_ptr,
    CHUNKS_BLOCK: tl.constexpr,
    CANDIDATES_BLOCK: tl.constexpr,
    TOP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_BLOCK)
    in_row = offs < num_chunks
    highs = tl.load(part_max_ptr + row * num_chunks + offs, mask=in_row, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row * num_chunks + offs, mask=in_row, other=0.0)
    high = tl.max(highs, axis=0)
    shift = tl.where(high == float("-inf"), 0.0, high)
    lse = shift + tl.log(tl.sum(sums * tl.exp(highs - shift), axis=0))
    rank = tl.sum(tl.load(part_count_ptr + row * num_chunks + offs, mask=in_row, other=0), axis=0)
    token = tl.load(token_ids_ptr + row)
    chosen = tl.load(logits_ptr + row * logits_row_stride + token).to(tl.float32)
    out = row * (num_top + 1)
    tl.store(ids_ptr + out, token.to(tl.int64))
    tl.store(values_ptr + out, chosen - lse)
    tl.store(ranks_ptr + row, rank.to(tl.int64))
    if TOP > 0:
        cand = tl.arange(0, CANDIDATES_BLOCK)
        num_candidates = num_chunks * TOP
        base = row * num_candidates
        key = tl.load(part_key_ptr + base + cand, mask=cand < num_candidates, other=KEY_BELOW_ALL)
        for j in tl.static_range(TOP):
            best_key, best = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
            index = tl.load(part_index_ptr + base + best)
            tl.store(ids_ptr + out + 1 + j, index.to(tl.int64), mask=j < num_top)
            tl.store(values_ptr + out + 1 + j, _key_value(best_key) - lse, mask=j < num_top)
            key = tl.where(cand == best, KEY_BELOW_ALL, key)
