"""One unified paged-attention Triton kernel for prefill, decode and mixed batches (+ a split-KV reduction).

Work decomposition. A program owns one *query tile* of one request and one KV head. A tile holds ``BLOCK_Q``
consecutive query tokens of the request times the ``G = num_heads // num_kv_heads`` query heads that share the KV
head, laid out as ``BLOCK_M >= BLOCK_Q * G`` rows (row ``r`` is token ``r // G``, head ``r % G``), so one K/V
tile read from memory serves every query head of the group (GQA-aware) and decode still feeds ``tl.dot`` with
16+ rows. Tiles are numbered without any host work: request ``i``'s tiles start at ``cu_q[i] // BLOCK_Q + i`` (an
upper bound on the tiles before it), so the grid is ``num_tokens // BLOCK_Q + num_reqs`` tiles and a program finds
its request by binary search over ``query_start_loc``; surplus programs exit at once.

Per program: the query rows sit at positions ``context_len + token`` (``context_len = seq_len - query_len``), so
the keys it needs are ``[lo, hi)`` with ``hi = min(seq_len, context_len + last token + 1)`` and ``lo = 0`` or, with
a sliding window ``W``, ``first position - W + 1``. It walks that range in ``BLOCK_N``-key tiles, mapping key
``n`` to physical slot ``block_table[i, n // BLOCK_SIZE] * BLOCK_SIZE + n % BLOCK_SIZE`` (pages may be anywhere),
and keeps an online softmax (running max ``m``, sum ``l``, fp32 accumulator). Masking is per element: causal,
window, context end. Fully masked rows keep ``m = -inf`` and are guarded against ``inf - inf``.

Key tiles wholly inside the keys every row of the program sees (before the causal diagonal, inside its split; no
sliding window) run a loop without score or load masks, the rest a masked one (``triton_tiles.attend_tiles``).
sm_90 SASS of a decode launch (Triton 3.6): 377 instructions per 64-key iteration for bf16 and 360 for fp8 in the
unmasked loop, against 604 and 443 when every tile was masked. Padding rows (no query) score those keys against a
zero query: finite, and never stored.

Mixed batches: a 64-row tile wastes 15/16 of its rows on a decode token, so the host may launch the kernel twice
over the same metadata, once with 16-row tiles for the requests whose query is short and once with 64-row tiles
for the rest (``min_q_len``/``max_q_len`` select a program's requests; the others exit at once).

K/V tiles are cast to the query's dtype as they are loaded. With an fp8 cache (unit scale) a 16-bit query is cast to
fp16 first, so the tiles widen in one conversion and the dots run in fp16 (fp32 accumulation, as in bf16); a query
value past fp16's range (65504) would be clamped to it. Where the widening happens is ``FP8_WIDEN`` (a GPU with
fp8 conversions, sm_89+): 0 leaves it to Triton, which keeps the 8-bit tile in shared memory and widens it as the
dot reads it (for the value tile, read transposed, that is one byte-wide shared load per value); 1 widens the value
tile and 2 both tiles right after their load (``widen_fp8``, an opaque op Triton cannot move into the dot), so the
tile is read from shared memory in 16-byte vectors and the fp16 copy reaches the dot through ldmatrix.

Split-KV (flash-decoding): with ``NUM_SPLITS > 1`` the key range is cut into ``NUM_SPLITS`` contiguous segments
(split count fixed by the caller from the batch shape only, so CUDA graphs stay valid as contexts grow); each
program writes its unnormalised accumulator and ``(m, l)`` to fp32 scratch, and ``_reduce_splits_kernel`` merges
them with the usual ``exp(m_s - max m)`` rescaling. A segment that is empty for a row (its range starts past the
row's keys, e.g. a short sequence cut into more segments than it has key tiles) or fully masked for it (causal,
window) leaves ``m = -inf, l = 0, acc = 0`` and gets weight ``exp(-inf) = 0``; a row with every segment empty
reduces to 0, never ``inf - inf``. Invariant: the reduction writes only rows the split launch served; in a mixed
batch's double launch the split launch serves a subset of the requests (``FILTER``) and the other rows hold the
short launch's output while their scratch rows were never written.

Attention sinks (``HAS_SINKS``, gpt-oss): one logit per query head that joins the softmax's sum without a value.
It is folded in once per row, at the end: by the program itself without splits (``fold_sinks``), by the reduction
with them (never per split, which would count it ``NUM_SPLITS`` times). Without sinks the kernels compile as
before (``HAS_SINKS`` is a constexpr; ``sinks_ptr`` is then any tensor, never read).
"""

from __future__ import annotations

import triton
import triton.language as tl

from treadle_kernels.attention.triton_tiles import LOG2E, attend_tiles, fold_sinks


@triton.jit
def _find_request(query_start_loc_ptr, tile, last_req, BLOCK_Q: tl.constexpr, PER_REQ: tl.constexpr):
    """Largest request i <= last_req with query_start_loc[i] // BLOCK_Q + i * PER_REQ <= tile (binary search).

    ``PER_REQ = 1``: the request owning query tile ``tile``; ``BLOCK_Q = 1, PER_REQ = 0``: the owner of token ``tile``.
    """
    lo = 0
    hi = last_req
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid * PER_REQ
        if start <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def key_segment(
    context_len,
    q_tile,
    seq_len,
    split,
    window,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    MASK_ALL: tl.constexpr,
):
    """The keys query tile ``q_tile`` of a request needs, this split's share of them: ``(seg_lo, open_hi, seg_hi)``.
    Tiles wholly inside the keys every row sees (``[seg_lo, open_hi)``: causal rows sit at the tile's first position
    or later) take the loop without masks; the rest, and every tile under a sliding window (or ``MASK_ALL``), the
    masked one. Rows that hold no query (padding) score the unmasked keys against a zero query: finite, and never
    stored."""
    first_pos = context_len + q_tile * BLOCK_Q
    last_pos = tl.minimum(context_len + q_tile * BLOCK_Q + BLOCK_Q, seq_len) - 1
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
    kv_hi = last_pos + 1
    if not CAUSAL:
        kv_hi = seq_len
    kv_lo = (kv_lo // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:
        num_tiles = tl.cdiv(kv_hi - kv_lo, BLOCK_N)
        per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        seg_lo = kv_lo + split * per_split * BLOCK_N
        seg_hi = tl.minimum(seg_lo + per_split * BLOCK_N, kv_hi)
    else:
        seg_lo = kv_lo
        seg_hi = kv_hi
    open_hi = seg_lo
    if not USE_WINDOW and not MASK_ALL:
        open_hi = seg_hi
        if CAUSAL:
            open_hi = tl.minimum(seg_hi, first_pos + 1)
        open_hi = tl.maximum(seg_lo + (open_hi - seg_lo) // BLOCK_N * BLOCK_N, seg_lo)
    return seg_lo, open_hi, seg_hi


# Batch-shape integers are not specialised (Triton would compile a variant for value 1 and for multiples of 16 of
# each): the decode graphs of 35 batch sizes and the prefill shapes then share one compiled kernel per tile config.
_BATCH_INTS = ["num_reqs", "min_q_len", "max_q_len"]


@triton.jit(do_not_specialize=_BATCH_INTS)
def paged_attention_kernel(
    out_ptr,  # [T, nh, d] or, with splits, fp32 partial accumulators [T, nh, NUM_SPLITS, d]
    part_m_ptr,  # [T, nh, NUM_SPLITS] fp32 running max (split path only)
    part_l_ptr,  # [T, nh, NUM_SPLITS] fp32 running sum (split path only)
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sinks_ptr,  # [nh] sink logits (HAS_SINKS only; the split path's are applied by the reduction)
    num_reqs,
    min_q_len,  # this launch serves only requests with min_q_len <= query_len <= max_q_len
    max_q_len,
    scale,
    soft_cap,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_os,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr = True,  # False: a layer's K (and V) cache has < 2**31 elements, 32-bit offsets do
    FP8_WIDEN: tl.constexpr = 0,  # fp8 cache on sm_89+: 1 widens the V tile after its load, 2 K and V (docstring)
    SCORE_MASK_ALWAYS: tl.constexpr = False,  # every tile takes the masked loop (measurement)
    HAS_SINKS: tl.constexpr = False,  # fold sinks_ptr's per-head logits into the softmax (gpt-oss)
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
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
    tok = q_tile * BLOCK_Q + rows // G  # token index within the request
    head = kv_head * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (tok < q_len)
    q_pos = context_len + tok
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM

    q_offs = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter mis-computes 16-bit float dots; compute them in fp32 there
        q = q.to(tl.float32)
    elif k_cache_ptr.dtype.element_ty.is_fp8() and q_ptr.dtype.element_ty != tl.float32:
        # fp8 widens to fp16 in one conversion (to bf16 in three): attend in fp16, q clamped to its range
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    qk_scale = scale * LOG2E
    bt_row = block_table_ptr + req * stride_bt
    seg_lo, open_hi, seg_hi = key_segment(context_len, q_tile, seq_len, split, window, BLOCK_Q, BLOCK_N, NUM_SPLITS,
                                          CAUSAL, USE_WINDOW, SCORE_MASK_ALWAYS)  # fmt: skip
    args = (q, k_cache_ptr, v_cache_ptr, bt_row, seg_hi, kv_head, stride_kb, stride_ks, stride_kh, stride_vb,
            stride_vs, stride_vh, dims, dim_ok, row_ok, q_pos, qk_scale, scale, soft_cap, window)  # fmt: skip
    m_i, l_i, acc = attend_tiles(m_i, l_i, acc, seg_lo, open_hi, *args, BLOCK_SIZE, BLOCK_N, CAUSAL, USE_WINDOW,
                                  USE_SOFT_CAP, DOT_PRECISION, WIDE_OFFSETS, FP8_WIDEN, False)  # fmt: skip
    m_i, l_i, acc = attend_tiles(m_i, l_i, acc, open_hi, seg_hi, *args, BLOCK_SIZE, BLOCK_N, CAUSAL, USE_WINDOW,
                                  USE_SOFT_CAP, DOT_PRECISION, WIDE_OFFSETS, FP8_WIDEN, True)  # fmt: skip

    o_offs = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    o_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        if HAS_SINKS:
            m_i, l_i, acc = fold_sinks(m_i, l_i, acc, sinks_ptr, head, row_ok)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(out_ptr + o_offs + split * stride_os, acc, mask=o_mask)
        num_heads = G * tl.num_programs(1)
        ml_offs = ((q_start + tok) * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + ml_offs, m_i, mask=row_ok)
        tl.store(part_l_ptr + ml_offs, l_i, mask=row_ok)


@triton.jit
def not_served(query_start_loc_ptr, token, num_reqs, min_q_len, max_q_len):
    """Whether token ``token``'s request lies outside the launch's query lengths (a mixed batch's other launch)."""
    req = _find_request(query_start_loc_ptr, token, num_reqs - 1, 1, 0)
    q_len = tl.load(query_start_loc_ptr + req + 1) - tl.load(query_start_loc_ptr + req)
    return (q_len < min_q_len) or (q_len > max_q_len)


@triton.jit
def split_stats(part_m_ptr, part_l_ptr, base, NUM_SPLITS: tl.constexpr):
    """The split index range and one (token, head) row's per-split running max and sum (``base``: its row)."""
    splits = tl.arange(0, NUM_SPLITS)
    return (
        splits,
        tl.load(part_m_ptr + base * NUM_SPLITS + splits),
        tl.load(part_l_ptr + base * NUM_SPLITS + splits),
    )


@triton.jit(do_not_specialize=_BATCH_INTS)
def reduce_splits_kernel(
    out_ptr,  # [T, nh, d]
    part_acc_ptr,  # [T, nh, NUM_SPLITS, HEAD_DIM_PAD] fp32
    part_m_ptr,  # [T, nh, NUM_SPLITS] fp32
    part_l_ptr,
    query_start_loc_ptr,
    sinks_ptr,  # [nh] sink logits (HAS_SINKS only)
    num_reqs,
    min_q_len,  # with FILTER, only tokens of requests with min_q_len <= query_len <= max_q_len are reduced
    max_q_len,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FILTER: tl.constexpr,  # the split launch served only some requests (mixed batch); skip the others' rows
    HAS_SINKS: tl.constexpr = False,  # the head's sink logit joins the merged sum, once (gpt-oss)
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if FILTER:  # noqa: SIM102 (a constexpr guard: without FILTER the request search is not compiled)
        if not_served(query_start_loc_ptr, token, num_reqs, min_q_len, max_q_len):
            return
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    base = token * num_heads + head
    splits, m, l_s = split_stats(part_m_ptr, part_l_ptr, base, NUM_SPLITS)
    m_max = tl.max(m, axis=0)
    if HAS_SINKS:  # one more logit, with no value: it joins the max and the sum
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        m_max = tl.maximum(m_max, sink)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # empty or fully masked splits: exp2(-inf) = 0
    denom = tl.sum(w * l_s, axis=0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m_max)
    acc_offs = (base * NUM_SPLITS + splits)[:, None] * HEAD_DIM_PAD + dims[None, :]
    acc = tl.load(part_acc_ptr + acc_offs, mask=dim_ok[None, :], other=0.0)  # padded dims were never written
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok
    )
