"""Triton kernels for ``argmax_rows``, a two-stage row argmax (imported lazily: this module imports triton).

Stage 1, grid (rows, chunks): each program reduces ``CHUNK`` logits of one row to (key, index) of the first
maximum in its chunk. Stage 2, grid (rows,): one program per row reduces that row's chunk partials, taking
the first chunk holding the largest key; chunks are in column order, so that is the row's first maximum.

Comparisons are made on an int32 order key instead of on floats: the fp32 bits read as sign-magnitude and
turned into two's complement (``-magnitude`` for negative numbers), with ``-0.0`` and ``+0.0`` both mapping
to 0 and every NaN to the largest int32. Integer order is then exactly torch.argmax's order (NaN above
``+inf``, signed zeros tie), first-index tie-breaking is exact, nothing depends on how the hardware compares
NaN or denormals, and Triton's interpreter (which reduces floats with NaN-ignoring numpy functions) computes
what the GPU does. Partials store the key, which encodes the chunk's fp32 maximum (up to zero's sign and
NaN payload).
"""

from __future__ import annotations

import triton
import triton.language as tl

# below the key of -inf (-0x7F800000): masked lanes and absent chunks never win
KEY_BELOW_ALL = tl.constexpr(-2147483647)


@triton.jit
def _order_key(x):
    """int32 keys ordered like torch.argmax orders ``x`` (fp32/fp16/bf16 widened to fp32, exactly)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -magnitude, magnitude)  # -0.0 -> 0, like +0.0
    return tl.where(magnitude > 0x7F800000, 0x7FFFFFFF, key)  # NaN (either sign) above +inf


@triton.jit
def argmax_chunks_kernel(
    logits_ptr,
    logits_row_stride,
    vocab_size,
    part_key_ptr,
    part_index_ptr,
    CHUNK: tl.constexpr,
):
    x, _cols, mask, row, chunk = load_chunk(logits_ptr, logits_row_stride, vocab_size, CHUNK)
    store_chunk_argmax(x, mask, row, chunk, part_key_ptr, part_index_ptr, CHUNK)


@triton.jit
def load_chunk(logits_ptr, logits_row_stride, vocab_size, CHUNK: tl.constexpr):
    """The logits of this (row, chunk) program with their columns and mask (masked lanes read 0), the row (int64)
    and the chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = cols < vocab_size
    x = tl.load(logits_ptr + row * logits_row_stride + cols, mask=mask, other=0.0)
    return x, cols, mask, row, chunk


@triton.jit
def store_chunk_argmax(x, mask, row, chunk, part_key_ptr, part_index_ptr, CHUNK: tl.constexpr):
    """Store (order key, index) of the first maximum of chunk ``chunk`` of row ``row`` (values ``x``, lanes
    outside the row masked) into the [rows, chunks] partials."""
    key = tl.where(mask, _order_key(x), KEY_BELOW_ALL)
    best_key, best = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    slot = row * tl.num_programs(1) + chunk  # partials are [rows, chunks], contiguous
    tl.store(part_key_ptr + slot, best_key)
    tl.store(part_index_ptr + slot, chunk * CHUNK + best)


@triton.jit
def argmax_reduce_kernel(
    part_key_ptr,
    part_index_ptr,
    num_chunks,
    out_ptr,
    CHUNKS_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_BLOCK)
    base = row * num_chunks
    key = tl.load(part_key_ptr + base + offs, mask=offs < num_chunks, other=KEY_BELOW_ALL)
    _, best = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    index = tl.load(part_index_ptr + base + best)
    tl.store(out_ptr + row, index.to(tl.int64))
