"""Triton paged KV-cache write kernel (imported lazily: this module imports triton).

Grid (tokens,). A program reads its slot; a negative slot masks every load and store off (padding tokens).
Otherwise it copies the token's [kv_heads, head_size] tile of key and of value to
``cache[slot // block_size, slot % block_size]``, casting to the cache dtype (``FP8_MAX > 0``: an fp8 cache,
values clamped to +-FP8_MAX first, as ``treadle_ir.ops.cache.to_kv_cache_dtype``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    key_token_stride,
    key_head_stride,
    value_token_stride,
    value_head_stride,
    kc_block_stride,
    kc_slot_stride,
    kc_head_stride,
    vc_block_stride,
    vc_slot_stride,
    vc_head_stride,
    num_kv_heads,
    head_size,
    block_size,
    HEADS_BLOCK: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    FP8_MAX: tl.constexpr,
    INTERPRETED: tl.constexpr,  # the CPU interpreter (see to_cache)
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    valid = slot >= 0
    safe_slot = tl.where(valid, slot, 0)
    block = safe_slot // block_size
    offset = safe_slot % block_size
    heads = tl.arange(0, HEADS_BLOCK)[:, None]
    dims = tl.arange(0, DIM_BLOCK)[None, :]
    slot_tile = tl.full([HEADS_BLOCK, DIM_BLOCK], 0, tl.int64) + slot  # broadcast the scalar test
    mask = (heads < num_kv_heads) & (dims < head_size) & (slot_tile >= 0)
    key = tl.load(key_ptr + token * key_token_stride + heads * key_head_stride + dims, mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + heads * value_head_stride + dims, mask=mask)
    kc = key_cache_ptr + block * kc_block_stride + offset * kc_slot_stride + heads * kc_head_stride + dims
    vc = value_cache_ptr + block * vc_block_stride + offset * vc_slot_stride + heads * vc_head_stride + dims
    tl.store(kc, to_cache(key, key_cache_ptr.dtype.element_ty, FP8_MAX, INTERPRETED), mask=mask)
    tl.store(vc, to_cache(value, value_cache_ptr.dtype.element_ty, FP8_MAX, INTERPRETED), mask=mask)


@triton.jit
def to_cache(x, dtype: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRETED: tl.constexpr):
    """``x`` cast to the cache dtype; with ``FP8_MAX > 0`` (an fp8 cache) clamped to +-FP8_MAX in fp32 first.

    A GPU narrows to fp8 rounding to nearest even. Triton 3.x's CPU interpreter does not: it drops the carry into
    the exponent (1.99 becomes 1.0 in e4m3), so under ``INTERPRETED`` the value is first rounded onto the fp8 grid
    in fp32 and the cast only relabels an exact value."""
    if FP8_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
        if INTERPRETED:
            x = _round_to_fp8_grid(x, FP8_MAX)
    return x.to(dtype)


@triton.jit
def _round_to_fp8_grid(x, FP8_MAX: tl.constexpr):
    """fp32 ``x`` rounded to nearest even on the grid of e4m3 (``FP8_MAX`` 448: 3 mantissa bits, smallest normal
    2^-6) or e5m2 (57344: 2 bits, 2^-14): the step at x's binade (subnormal below the smallest normal) times
    1.5 * 2^23, added and subtracted, rounds in fp32's own round-to-nearest-even."""
    mbits = 3
    emin = -6
    if FP8_MAX > 448.0:
        mbits = 2
        emin = -14
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, emin)
    step = ((exponent - mbits + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0
    return (x + magic) - magic
