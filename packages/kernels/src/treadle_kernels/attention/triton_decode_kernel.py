"""Fused decode attention (imported lazily: this module imports triton): rotary, the KV-cache write, split-KV
attention and the split reduction in one launch, for a step where every request has one query token.

Unfused, a decode layer runs four small kernels between its qkv and o projections (rotary, KV write, attention,
split reduction); at batch 1 each is a few microseconds of launch latency for almost no work. Here one program
per (token, KV head, split) does all four:

1. Rotary (neox layout, full head): the G query heads of the KV group and the new key are rotated in fp32 from the
   token's ``cos_sin_cache`` row and rounded to the model dtype, exactly as ``ops.rotary_embedding_`` would leave
   them in the qkv buffer.
2. Attention over the cached keys ``[lo, seq_len - 1)`` (``lo`` from the sliding window) in ``BLOCK_N``-key
   tiles through the block table, as the unified kernel walks them; the query is held as its two rotary halves,
   so a score is ``q1 . k1 + q2 . k2`` with ``k1``/``k2`` the halves of the cached key.
3. The new token (position ``seq_len - 1``) is never read back from the cache: split 0 scores it from registers
   and folds it into its online softmax, then writes its rotated key and its value to ``slot_mapping[token]``
   (skipped for a negative slot). No program reads that slot this step, so the write races with nothing. With an
   fp8 cache the new token is scored at the precision the cache stores it (as an unfused backend reads it back).
4. ``NUM_SPLITS > 1``: each split stores its unnormalised accumulator and ``(m, l)`` to fp32 scratch, then takes a
   ticket from ``counter[token, kv_head]`` (an atomic add, acquire-release at GPU scope, after a CTA barrier so
   every thread's stores are ordered before it). The split that draws the last ticket merges all splits
   (``exp2(m_s - max m)`` rescaling; empty splits carry ``m = -inf, l = 0``), writes the output and resets the
   counter to 0, so the same counters serve the next layer and step. Scratch is read with ``.cg`` loads (L2),
   never through a possibly stale L1 line.
With ``HAS_SINKS`` (gpt-oss) each head's sink logit is folded into its finished softmax once: by the program
without splits, by the merging split with them (``fold_sinks``).
With ``USE_PDL`` the kernel reads its step metadata and rotary row, lets the next kernel (the o projection) launch
and start streaming its weight, and waits for the qkv projection before reading q, k and v.
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_kernels.attention.triton_tiles import LOG2E, fold_sinks, online_softmax_step
from treadle_kernels.ops.cache_kernels import to_cache


@triton.jit
def _rotate(x1, x2, cos, sin, dtype: tl.constexpr):
    """The neox pair rotation in fp32, rounded to ``dtype`` (as the rotary op stores it)."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit(do_not_specialize=["window"])
def decode_attention_kernel(
    out_ptr,  # [T, nh, d]
    part_acc_ptr,  # [T, nh, NUM_SPLITS, d] fp32 (split path only)
    part_m_ptr,  # [T, nh, NUM_SPLITS] fp32
    part_l_ptr,
    counter_ptr,  # [>= T * nkv] int32, all zero between launches
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_sin_ptr,  # [max_position, d]: cos in the first d/2 columns, sin in the rest
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    slot_mapping_ptr,
    sinks_ptr,  # [nh] sink logits (HAS_SINKS only)
    scale,
    window,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_cs,
    stride_cb,  # cache strides (block, slot, head), shared by the key and value caches
    stride_cslot,
    stride_chead,
    stride_bt,
    G: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2, a power of two
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # G padded to a power of two >= 16 (tl.dot rows)
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # the CPU interpreter mis-computes 16-bit dots: compute them in fp32 there
    USE_PDL: tl.constexpr,  # launched early (programmatic dependent launch): wait before reading q, k, v
    FP8_MAX: tl.constexpr,  # > 0: an fp8 cache (unit scale), the new K/V clamped to +-FP8_MAX as they are stored
    HAS_SINKS: tl.constexpr = False,  # fold sinks_ptr's per-head logits into the softmax (gpt-oss)
):
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    dtype = out_ptr.dtype.element_ty

    seq_len = tl.load(seq_lens_ptr + token)
    q_pos = seq_len - 1  # the new token's index in its sequence
    rot_row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cs
    half = tl.arange(0, HALF)
    dims = tl.arange(0, 2 * HALF)
    cos = tl.load(rot_row + half).to(tl.float32)
    sin = tl.load(rot_row + HALF + half).to(tl.float32)

    new_slot = tl.load(slot_mapping_ptr + token)
    if USE_PDL:  # what is read above was written before the step began; q, k, v come from the kernel ahead
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G
    head = kv_head * G + rows
    q_row = q_ptr + token * stride_qt + head[:, None] * stride_qh + half[None, :]
    q1, q2 = _rotate(tl.load(q_row, mask=row_ok[:, None], other=0.0),
                     tl.load(q_row + HALF, mask=row_ok[:, None], other=0.0), cos, sin, dtype)  # fmt: skip
    k_row = k_ptr + token * stride_kt + kv_head * stride_kh + half
    k1_new, k2_new = _rotate(tl.load(k_row), tl.load(k_row + HALF), cos, sin, dtype)
    v_new = tl.load(v_ptr + token * stride_vt + kv_head * stride_vh + dims)
    # what the cache will hold (a no-op unless it is fp8); the new token is scored as it will be read back
    k1_cached = to_cache(k1_new, k_cache_ptr.dtype.element_ty, FP8_MAX, UPCAST)
    k2_cached = to_cache(k2_new, k_cache_ptr.dtype.element_ty, FP8_MAX, UPCAST)
    v_cached = to_cache(v_new, v_cache_ptr.dtype.element_ty, FP8_MAX, UPCAST)
    k1_new, k2_new, v_new = k1_cached.to(dtype), k2_cached.to(dtype), v_cached.to(dtype)
    if UPCAST:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)

    # this split's share of the cached keys [lo, seq_len - 1)
    kv_hi = q_pos
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(q_pos - window + 1, 0)
    kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
    seg_lo = kv_lo
    seg_hi = kv_hi
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(kv_hi - kv_lo, BLOCK_N), NUM_SPLITS)
        seg_lo = kv_lo + split * per_split * BLOCK_N
        seg_hi = tl.minimum(seg_lo + per_split * BLOCK_N, kv_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
    qk_scale = scale * LOG2E
    cols = tl.arange(0, BLOCK_N)
    bt_row = block_table_ptr + token * stride_bt
    for n0 in range(seg_lo, seg_hi, BLOCK_N):
        k_pos = n0 + cols
        k_ok = k_pos < seg_hi
        page = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = page * stride_cb + (k_pos % BLOCK_SIZE) * stride_cslot + kv_head * stride_chead
        k1 = tl.load(k_cache_ptr + slot[None, :] + half[:, None], mask=k_ok[None, :], other=0.0)  # [HALF, N]
        k2 = tl.load(k_cache_ptr + slot[None, :] + HALF + half[:, None], mask=k_ok[None, :], other=0.0)
        v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=k_ok[:, None], other=0.0)  # [N, D]
        v = v.to(q1.dtype)  # an fp8 cache is read at unit scale; under UPCAST q1 is fp32
        s = tl.dot(q1, k1.to(q1.dtype), input_precision=DOT_PRECISION)
        s = tl.dot(q2, k2.to(q2.dtype), s, input_precision=DOT_PRECISION) * qk_scale
        ok = row_ok[:, None] & k_ok[None, :]
        if USE_WINDOW:
            ok = ok & (k_pos[None, :] > q_pos - window)
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    # the new token, from registers, in split 0 only
    own = (rows * 0 + split) == 0  # [M], all true in split 0
    s_new = tl.sum(q1.to(tl.float32) * k1_new.to(tl.float32)[None, :], axis=1)
    s_new = (s_new + tl.sum(q2.to(tl.float32) * k2_new.to(tl.float32)[None, :], axis=1)) * qk_scale
    s_new = tl.where(row_ok & own, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p_new = tl.exp2(s_new - m_safe).to(dtype).to(tl.float32)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    m_i = m_new
    writer = tl.where(split == 0, new_slot, -1)  # split 0 writes the new K/V (not to a negative slot)
    write_half = (half * 0 + writer) >= 0  # masks broadcast explicitly (the interpreter needs tensor masks)
    write_dims = (dims * 0 + writer) >= 0
    cache_at = (
        (new_slot // BLOCK_SIZE) * stride_cb + (new_slot % BLOCK_SIZE) * stride_cslot + kv_head * stride_chead
    )
    tl.store(k_cache_ptr + cache_at + half, k1_cached, mask=write_half)
    tl.store(k_cache_ptr + cache_at + HALF + half, k2_cached, mask=write_half)
    tl.store(v_cache_ptr + cache_at + dims, v_cached, mask=write_dims)

    o_offs = token * stride_ot + head[:, None] * stride_oh + dims[None, :]
    if NUM_SPLITS == 1:
        if HAS_SINKS:
            m_i, l_i, acc = fold_sinks(m_i, l_i, acc, sinks_ptr, head, row_ok)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + o_offs, out.to(dtype), mask=row_ok[:, None])
    else:
        num_heads = G * num_kv_heads
        ml = (token * num_heads + head) * NUM_SPLITS  # [M] first split of each row
        tl.store(part_acc_ptr + (ml + split)[:, None] * (2 * HALF) + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + ml + split, m_i, mask=row_ok)
        tl.store(part_l_ptr + ml + split, l_i, mask=row_ok)
        tl.debug_barrier()  # every thread's partial stores happen before the ticket's release
        counter = counter_ptr + token * num_kv_heads + kv_head
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == NUM_SPLITS - 1:  # the last split to finish merges them all
            m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
            a_run = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
            for s in tl.static_range(NUM_SPLITS):
                m_s = tl.load(part_m_ptr + ml + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(part_l_ptr + ml + s, mask=row_ok, other=0.0, cache_modifier=".cg")
                a_s = tl.load(part_acc_ptr + (ml + s)[:, None] * (2 * HALF) + dims[None, :],
                              mask=row_ok[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
                m_top = tl.maximum(m_run, m_s)
                m_top_safe = tl.where(m_top == float("-inf"), 0.0, m_top)
                w_run = tl.exp2(m_run - m_top_safe)
                w_s = tl.exp2(m_s - m_top_safe)
                l_run = l_run * w_run + l_s * w_s
                a_run = a_run * w_run[:, None] + a_s * w_s[:, None]
                m_run = m_top
            if HAS_SINKS:
                m_run, l_run, a_run = fold_sinks(m_run, l_run, a_run, sinks_ptr, head, row_ok)
            out = a_run / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
            tl.store(out_ptr + o_offs, out.to(dtype), mask=row_ok[:, None])
            tl.atomic_xchg(counter, 0)
