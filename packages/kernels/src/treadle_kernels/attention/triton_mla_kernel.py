"""The paged-attention Triton kernel for a shared key/value cache (multi-head latent attention, DeepSeek's MLA) and
its split-KV reduction. Launched by ``triton_mla.py``.

An MLA layer caches one vector a token, ``D = MAIN + TAIL`` wide (the latent ``c`` and the rotated ``k_pe``: 512 +
64 in the real models), that is both the key and the value of every query head (one KV head). The unified kernel
(``triton_kernel.py``) reads such a cache as it reads any: a key tile and a value tile loaded apart, each padded to
the next power of two (576 -> 1024, 1.8x the multiplies), with one query row per head at 16-key tiles to fit
Hopper's shared memory. Here the head is cut in two power-of-two parts instead (``MAIN`` the largest power of two
<= D, ``TAIL`` the rest, padded to ``TAIL_PAD``): each key tile is loaded once, as ``[BLOCK_N, MAIN]`` and
``[BLOCK_N, TAIL_PAD]``, and serves both dots: the scores ``q_main . c^T + q_tail . r^T`` and the output
``p . c`` / ``p . r`` (the value is the same vector). The output is the whole D-wide softmax sum, as the contract
asks (the model reads its first ``MAIN`` dims).

Work decomposition as in the unified kernel (its docstring): a program owns one query tile of one request, but of
``HEADS`` query heads at a time (program axis 1 numbers the head blocks; every block reads the one KV head), rows
``BLOCK_M >= BLOCK_Q * HEADS`` (row ``r`` is token ``r // HEADS``, head ``r % HEADS``), the same tile numbering,
the same causal key range, split-KV segments, and the masked / unmasked key loops. No sliding window, soft cap or
sinks (no MLA model has them; the backend sends such layers to the unified kernel). An fp8 cache (unit scale) is
read as in the unified kernel: the 16-bit query is cast to fp16 (clamped to its range) and the tiles widen to fp16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_kernels.attention.triton_kernel import (
    _BATCH_INTS,
    _find_request,
    key_segment,
    not_served,
    split_stats,
)
from treadle_kernels.attention.triton_tiles import LOG2E, key_pages


@triton.jit
def _latent_tiles(
    m_i,
    l_i,
    acc_main,
    acc_tail,
    lo,
    hi,
    q_main,
    q_tail,
    cache_ptr,
    bt_row,
    seg_hi,
    stride_cb,
    stride_cs,
    main,
    tail,
    tail_ok,
    row_ok,
    q_pos,
    qk_scale,
    MAIN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Fold the key tiles starting in ``[lo, hi)`` into the running softmax of both output parts; ``MASKED``: mask
    the scores (causal, segment end, rows without a query) and the page loads, else every key is visible."""
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + cols
        page, k_ok = key_pages(bt_row, k_pos, seg_hi, BLOCK_SIZE, WIDE_OFFSETS, MASKED)
        slot = page * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs
        key_ok = k_ok if MASKED else k_pos >= 0  # unmasked tiles: every key is in the segment
        c = tl.load(cache_ptr + slot[:, None] + main[None, :], mask=key_ok[:, None], other=0.0)  # [N, MAIN]
        r_offs = slot[:, None] + MAIN + tail[None, :]
        r = tl.load(cache_ptr + r_offs, mask=key_ok[:, None] & tail_ok[None, :], other=0.0)  # [N, TAIL_PAD]
        c = c.to(q_main.dtype)
        r = r.to(q_main.dtype)

        s = tl.dot(q_main, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(q_tail, tl.trans(r), acc=s, input_precision=DOT_PRECISION)  # [M, N] fp32
        s = s * qk_scale
        if MASKED:
            ok = row_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                ok = ok & (k_pos[None, :] <= q_pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(c.dtype)
        acc_main = acc_main * alpha[:, None] + tl.dot(p, c, input_precision=DOT_PRECISION)
        acc_tail = acc_tail * alpha[:, None] + tl.dot(p, r, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc_main, acc_tail


@triton.jit(do_not_specialize=_BATCH_INTS)
def latent_attention_kernel(
    out_ptr,  # [T, nh, D] or, with splits, fp32 partial accumulators [T, nh, NUM_SPLITS, D]
    part_m_ptr,  # [T, nh, NUM_SPLITS] fp32 running max (split path only)
    part_l_ptr,  # [T, nh, NUM_SPLITS] fp32 running sum (split path only)
    q_ptr,  # [T, nh, D] (rows may be strided)
    cache_ptr,  # [num_blocks, BLOCK_SIZE, 1, D]: the key and the value
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_reqs,
    min_q_len,  # this launch serves only requests with min_q_len <= query_len <= max_q_len
    max_q_len,
    num_heads,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_os,
    stride_cb,
    stride_cs,
    stride_bt,
    MAIN: tl.constexpr,  # leading dims of the head, a power of two (the latent)
    TAIL: tl.constexpr,  # the rest (the rotated part)
    TAIL_PAD: tl.constexpr,  # TAIL padded to a power of two >= 16
    HEADS: tl.constexpr,  # query heads per program
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr = True,
):
    tile = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    req = _find_request(query_start_loc_ptr, tile, num_reqs - 1, BLOCK_Q, 1)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + req)
    if (q_tile * BLOCK_Q >= q_len) or (q_len < min_q_len) or (q_len > max_q_len):
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // HEADS
    head = head_block * HEADS + rows % HEADS
    row_ok = (rows < BLOCK_Q * HEADS) & (tok < q_len) & (head < num_heads)
    q_pos = context_len + tok
    main = tl.arange(0, MAIN)
    tail = tl.arange(0, TAIL_PAD)
    tail_ok = tail < TAIL

    q_row = ((q_start + tok) * stride_qt + head * stride_qh)[:, None]
    q_main = tl.load(q_ptr + q_row + main[None, :], mask=row_ok[:, None], other=0.0)
    q_tail = tl.load(q_ptr + q_row + MAIN + tail[None, :], mask=row_ok[:, None] & tail_ok[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter mis-computes 16-bit float dots; compute them in fp32 there
        q_main = q_main.to(tl.float32)
        q_tail = q_tail.to(tl.float32)
    elif cache_ptr.dtype.element_ty.is_fp8() and q_ptr.dtype.element_ty != tl.float32:
        # fp8 widens to fp16 in one conversion: attend in fp16, q clamped to its range
        q_main = tl.minimum(tl.maximum(q_main.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        q_tail = tl.minimum(tl.maximum(q_tail.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    # the key range this tile needs, this split's share of it, and the tiles that take the loop without masks
    seg_lo, open_hi, seg_hi = key_segment(context_len, q_tile, seq_len, split, 0, BLOCK_Q, BLOCK_N, NUM_SPLITS, CAUSAL,
                                          False, False)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_main = tl.zeros([BLOCK_M, MAIN], dtype=tl.float32)
    acc_tail = tl.zeros([BLOCK_M, TAIL_PAD], dtype=tl.float32)
    bt_row = block_table_ptr + req * stride_bt
    args = (q_main, q_tail, cache_ptr, bt_row, seg_hi, stride_cb, stride_cs, main, tail, tail_ok, row_ok, q_pos,
            scale * LOG2E)  # fmt: skip
    m_i, l_i, acc_main, acc_tail = _latent_tiles(m_i, l_i, acc_main, acc_tail, seg_lo, open_hi, *args, MAIN, BLOCK_SIZE,
                                                 BLOCK_N, CAUSAL, DOT_PRECISION, WIDE_OFFSETS, False)  # fmt: skip
    m_i, l_i, acc_main, acc_tail = _latent_tiles(m_i, l_i, acc_main, acc_tail, open_hi, seg_hi, *args, MAIN, BLOCK_SIZE,
                                                 BLOCK_N, CAUSAL, DOT_PRECISION, WIDE_OFFSETS, True)  # fmt: skip

    o_row = ((q_start + tok) * stride_ot + head * stride_oh)[:, None]
    tail_mask = row_ok[:, None] & tail_ok[None, :]
    if NUM_SPLITS == 1:
        inv = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(out_ptr + o_row + main[None, :], (acc_main * inv[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip
        tl.store(out_ptr + o_row + MAIN + tail[None, :], (acc_tail * inv[:, None]).to(out_ptr.dtype.element_ty),
                 mask=tail_mask)  # fmt: skip
    else:
        o_row += split * stride_os
        tl.store(out_ptr + o_row + main[None, :], acc_main, mask=row_ok[:, None])
        tl.store(out_ptr + o_row + MAIN + tail[None, :], acc_tail, mask=tail_mask)
        ml_offs = ((q_start + tok) * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + ml_offs, m_i, mask=row_ok)
        tl.store(part_l_ptr + ml_offs, l_i, mask=row_ok)


@triton.jit(do_not_specialize=_BATCH_INTS)
def reduce_latent_splits_kernel(
    out_ptr,  # [T, nh, D]
    part_acc_ptr,  # [T, nh, NUM_SPLITS, D] fp32
    part_m_ptr,  # [T, nh, NUM_SPLITS] fp32
    part_l_ptr,
    query_start_loc_ptr,
    num_reqs,
    min_q_len,  # with FILTER, only tokens of requests with min_q_len <= query_len <= max_q_len are reduced
    max_q_len,
    num_heads,
    stride_ot,
    stride_oh,
    MAIN: tl.constexpr,
    TAIL: tl.constexpr,
    TAIL_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FILTER: tl.constexpr,  # the split launch served only some requests (mixed batch); skip the others' rows
):
    """Merge one (token, head)'s split partials (the unified reduction's rescaling, on the two-part head)."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if FILTER:  # noqa: SIM102 (a constexpr guard: without FILTER the request search is not compiled)
        if not_served(query_start_loc_ptr, token, num_reqs, min_q_len, max_q_len):
            return
    main = tl.arange(0, MAIN)
    tail = tl.arange(0, TAIL_PAD)
    tail_ok = tail < TAIL
    base = token * num_heads + head
    splits, m, l_s = split_stats(part_m_ptr, part_l_ptr, base, NUM_SPLITS)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty or fully masked splits: exp2(-inf) = 0
    denom = tl.sum(w * l_s, axis=0)
    inv = 1.0 / tl.where(denom == 0.0, 1.0, denom)
    rows = ((base * NUM_SPLITS + splits) * (MAIN + TAIL))[:, None]
    acc_main = tl.load(part_acc_ptr + rows + main[None, :])
    acc_tail = tl.load(part_acc_ptr + rows + MAIN + tail[None, :], mask=tail_ok[None, :], other=0.0)
    out_row = out_ptr + token * stride_ot + head * stride_oh
    tl.store(out_row + main, (tl.sum(acc_main * w[:, None], axis=0) * inv).to(out_ptr.dtype.element_ty))
    tl.store(out_row + MAIN + tail, (tl.sum(acc_tail * w[:, None], axis=0) * inv).to(out_ptr.dtype.element_ty),
             mask=tail_ok)  # fmt: skip
