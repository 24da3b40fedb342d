"""Triton rotary-embedding kernel (imported lazily: this module imports triton).

Grid (tokens,). A program loads its token's cos/sin row once and rotates every head of one tensor as a
[heads, rot_dim/2] tile of pairs (x1, x2): neox pairs ``i`` with ``i + rot_dim/2``, gpt-j pairs ``2i`` with
``2i + 1``. ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin`` in fp32, rounded once. Dims past ``rot_dim``
are not touched (the caller either writes in place or pre-copies them). Input and output may alias.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(
    positions_ptr,
    x_ptr,
    x_token_stride,
    x_head_stride,
    out_ptr,
    out_token_stride,
    out_head_stride,
    cache_ptr,
    cache_row_stride,
    num_heads,
    half_rot,
    IS_NEOX: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_BLOCK)
    pair_mask = pairs < half_rot
    cos = tl.load(cache_ptr + position * cache_row_stride + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + position * cache_row_stride + half_rot + pairs, mask=pair_mask, other=0.0).to(
        tl.float32
    )
    heads = tl.arange(0, HEADS_BLOCK)
    mask = (heads[:, None] < num_heads) & pair_mask[None, :]
    if IS_NEOX:
        first = pairs
        second = pairs + half_rot
    else:
        first = 2 * pairs
        second = 2 * pairs + 1
    x_row = x_ptr + token * x_token_stride + heads[:, None] * x_head_stride
    out_row = out_ptr + token * out_token_stride + heads[:, None] * out_head_stride
    x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(out_row + first[None, :], y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + second[None, :], y2.to(out_ptr.dtype.element_ty), mask=mask)
