"""Triton rotary-embedding kernel (imported lazily: this module imports triton).

Grid (tokens, 2): program (t, 0) rotates every query head of token t, program (t, 1) every key head, so q and
k take one launch. A program loads its token's cos/sin row once and rotates the heads of its tensor as a
[heads, rot_dim/2] tile of pairs (x1, x2): neox pairs ``i`` with ``i + rot_dim/2``, gpt-j pairs ``2i`` with
``2i + 1``. ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin`` in fp32, rounded once. Dims past ``rot_dim``
are not touched (the caller either writes in place or pre-copies them). Input and output may alias.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,
    x_token_stride,
    x_head_stride,
    out_ptr,
    out_token_stride,
    out_head_stride,
    num_heads,
    token,
    cos,
    sin,
    pairs,
    pair_mask,
    half_rot,
    IS_NEOX: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
):
    heads = tl.arange(0, HEADS_BLOCK)
    x_row = x_ptr + token * x_token_stride + heads[:, None] * x_head_stride
    out_row = out_ptr + token * out_token_stride + heads[:, None] * out_head_stride
    mask = (heads[:, None] < num_heads) & pair_mask[None, :]
    if IS_NEOX:
        first = pairs
        second = pairs + half_rot
    else:
        first = 2 * pairs
        second = 2 * pairs + 1
    x1 = tl.load(x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(out_row + first[None, :], y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + second[None, :], y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_qk_kernel(
    positions_ptr,
    q_ptr,
    q_token_stride,
    q_head_stride,
    q_out_ptr,
    q_out_token_stride,
    q_out_head_stride,
    num_q_heads,
    k_ptr,
    k_token_stride,
    k_head_stride,
    k_out_ptr,
    k_out_token_stride,
    k_out_head_stride,
    num_k_heads,
    cache_ptr,
    cache_row_stride,
    half_rot,
    IS_NEOX: tl.constexpr,
    Q_HEADS_BLOCK: tl.constexpr,
    K_HEADS_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_BLOCK)
    pair_mask = pairs < half_rot
    cos_row = cache_ptr + position * cache_row_stride
    cos = tl.load(cos_row + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_row + half_rot + pairs, mask=pair_mask, other=0.0).to(tl.float32)
    # the branches assign nothing (Triton needs one type per variable across them): each calls the helper
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr, q_token_stride, q_head_stride, q_out_ptr, q_out_token_stride, q_out_head_stride,
                      num_q_heads, token, cos, sin, pairs, pair_mask, half_rot, IS_NEOX, Q_HEADS_BLOCK)  # fmt: skip
    else:
        _rotate_heads(k_ptr, k_token_stride, k_head_stride, k_out_ptr, k_out_token_stride, k_out_head_stride,
                      num_k_heads, token, cos, sin, pairs, pair_mask, half_rot, IS_NEOX, K_HEADS_BLOCK)  # fmt: skip
