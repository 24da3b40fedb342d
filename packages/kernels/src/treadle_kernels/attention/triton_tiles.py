"""The key-tile loop of the unified paged-attention kernel (``triton_kernel.py``) and its pieces: the online
softmax step and the attention-sink fold (both shared with the fused decode kernel) and the fp8 widening.
Imported lazily: this module imports triton."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def widen_fp8(x):
    """fp8 (e4m3 or e5m2) to fp16, two values per conversion instruction (sm_89+). Inline assembly is opaque to
    Triton's layout passes: the conversion stays where it is written instead of being folded into the dot operand
    load (``FP8_WIDEN`` in triton_kernel.py's docstring)."""
    cvt: tl.constexpr = "cvt.rn.f16x2.e5m2x2" if x.dtype == tl.float8e5 else "cvt.rn.f16x2.e4m3x2"
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; " + cvt + " $0, lo; " + cvt + " $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4,
    )  # fmt: skip


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into a running softmax: scores ``s`` [M, N] (log2 units, -inf where masked) and values
    ``v`` [N, D] into the row max ``m_i``, sum ``l_i`` and unnormalised accumulator ``acc``; fully masked rows keep
    ``m = -inf`` without computing ``inf - inf``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def fold_sinks(m_i, l_i, acc, sinks_ptr, head, row_ok):
    """Fold each row's attention sink (gpt-oss; ``sinks_ptr[head]``, natural-log units, any float dtype) into
    a finished softmax: one more logit that joins the sum ``l_i`` but weighs no value. Returns the rescaled
    ``(m, l, acc)``; ``acc / l`` is then the output, 0 for a row that saw no key. Called once per row, after
    every key tile (and, split-KV, after the splits are merged)."""
    sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32) * LOG2E
    m_new = tl.maximum(m_i, sink)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.exp2(sink - m_safe)
    return m_new, l_i, acc * alpha[:, None]


@triton.jit
def key_pages(
    bt_row, k_pos, seg_hi, BLOCK_SIZE: tl.constexpr, WIDE_OFFSETS: tl.constexpr, MASKED: tl.constexpr
):
    """A key tile's physical pages (its block-table entries, 64-bit with ``WIDE_OFFSETS``) and which of its keys are
    in the segment (``MASKED``: the page loads skip the others; else every key is, by design)."""
    k_ok = k_pos < seg_hi
    if MASKED:
        page = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
    else:
        page = tl.load(bt_row + k_pos // BLOCK_SIZE)
    if WIDE_OFFSETS:
        page = page.to(tl.int64)
    return page, k_ok


@triton.jit
def attend_tiles(
    m_i,
    l_i,
    acc,
    lo,
    hi,
    q,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    seg_hi,
    kv_head,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    dims,
    dim_ok,
    row_ok,
    q_pos,
    qk_scale,
    scale,
    soft_cap,
    window,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    FP8_WIDEN: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Fold the key tiles starting in ``[lo, hi)`` into the running softmax; ``MASKED``: mask the scores (causal,
    window, segment end, rows without a query) and the page loads, else every key of these tiles is visible."""
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        k_pos = n0 + cols
        page, k_ok = key_pages(bt_row, k_pos, seg_hi, BLOCK_SIZE, WIDE_OFFSETS, MASKED)
        in_page = k_pos % BLOCK_SIZE
        k_offs = (page * stride_kb + in_page * stride_ks + kv_head * stride_kh)[None, :] + dims[:, None]
        key_ok = k_ok if MASKED else k_pos >= 0  # unmasked tiles: every key is in the segment
        k = tl.load(k_cache_ptr + k_offs, mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # [D, N]
        v_offs = (page * stride_vb + in_page * stride_vs + kv_head * stride_vh)[:, None] + dims[None, :]
        v = tl.load(v_cache_ptr + v_offs, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # [N, D]
        if FP8_WIDEN == 2:
            k = widen_fp8(k)
        if FP8_WIDEN >= 1:
            v = widen_fp8(v)
        v = v.to(q.dtype)  # an fp8 cache is read at unit scale; under UPCAST q is fp32

        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # [M, N] fp32
        if USE_SOFT_CAP:
            s = s * scale
            # cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0))
            s = s * LOG2E
        else:
            s = s * qk_scale
        if MASKED:
            ok = row_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                ok = ok & (k_pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                ok = ok & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    return m_i, l_i, acc
