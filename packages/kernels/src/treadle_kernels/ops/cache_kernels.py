"""Triton paged KV-cache write kernel (imported lazily: this module imports triton).

Grid (tokens,). A program reads its slot; a negative slot masks every load and store off (padding tokens).
Otherwise it copies the token's [kv_heads, head_size] tile of key and of value to
``cache[slot // block_size, slot % block_size]``, casting to the cache dtype.
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
    tl.store(kc, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, value.to(value_cache_ptr.dtype.element_ty), mask=mask)
