"""Triton kernel of ``gumbel.gumbel_sample``: temperature, exponential noise and the first stage of the row argmax in
one pass over the logits (imported lazily: this module imports triton).

Per (row, chunk) program: ``x / T - log(max(E, TINY))`` for the chunk's logits, with ``E = -log U`` and
``U = (fmix32(fmix32(v ^ k0) + k1) >> 9 + 0.5) / 2^23`` from the row's two 32-bit keys (the hash of
``treadle_model_runner.sample.gumbel``, uint32 arithmetic that wraps as the torch version's masked int64 does),
then the first maximum of the chunk as ``argmax_rows`` takes it (``store_chunk_argmax``); ``argmax_reduce_kernel``
finishes each row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .sampling_kernels import load_chunk, store_chunk_argmax

TINY = tl.constexpr(1.0e-30)  # floor of the exponential noise: log(0) would let a masked token win


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping multiply, logical shifts)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def gumbel_argmax_chunks_kernel(
    logits_ptr,
    logits_row_stride,
    vocab_size,
    temperature_ptr,  # [B] float32
    keys_ptr,  # [B, 2] int64 holding 32-bit keys
    part_key_ptr,
    part_index_ptr,
    CHUNK: tl.constexpr,
):
    x, cols, mask, row, chunk = load_chunk(logits_ptr, logits_row_stride, vocab_size, CHUNK)
    x = x.to(tl.float32) / tl.load(temperature_ptr + row)
    k0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    k1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    h = fmix32(fmix32(cols.to(tl.uint32) ^ k0) + k1)
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    noise = tl.maximum(-tl.log(u), TINY)
    store_chunk_argmax(x - tl.log(noise), mask, row, chunk, part_key_ptr, part_index_ptr, CHUNK)
