"""The ``triton`` backend's path for a shared key/value cache (MLA): launches of ``triton_mla_kernel.py``.

``applies`` says whether a call takes it: a stride-0 ``[2, ...]`` cache view (model-runner kv_cache.py) of one KV
head, no sliding window, soft cap or sinks, and ``TREADLE_ATTN_MLA`` not ``0`` (``0`` sends such layers to the
unified kernel, padded to a power of two, as before this path: for measurement). The launch shape comes from
``triton_launch.choose_launch_config`` with the query heads cut into blocks of ``HEADS`` (program axis 1 numbers
them as it would number KV heads), then the key tile, warps and stages of this kernel (``DECODE_TILES`` / ``PREFILL_TILES``); a mixed
batch is launched twice, as in the unified path (short queries in 16-row tiles, long ones in larger tiles).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from treadle_ir.ops.cache import FP8_KV_CACHE_DTYPES
from treadle_kernels.attention.metadata import AttentionMetadata
from treadle_kernels.attention.triton_launch import (
    DeviceProfile,
    LaunchConfig,
    choose_launch_config,
    split_scratch,
    wide_offsets,
)
from treadle_kernels.ops.launch import launch
from treadle_kernels.ops.support import next_pow2

_ENABLED = os.environ.get("TREADLE_ATTN_MLA", "1") != "0"


def _env_ints(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(x) for x in os.environ.get(name, default).split(","))


# A GPU launch's kernel variant by cache and query kind: decodes (16-row tiles) as (key tile, warps, stages),
# prefills as (rows, key tile, warps, stages); overridable for measurement, e.g. TREADLE_MLA_DECODE="32,4,2".
# H200, one 16-head layer, bf16 cache (results/gpu-session39-h200-6d3ee7e, call 2; ms): decodes b256 ctx1536 0.155
# at 32 keys, 4 warps, 2 stages against 0.199-0.328 for 64 keys or 8 warps or 16 keys; prefill 1 x 2048 0.545 at
# 32 rows, 64 keys, 8 warps, 2 stages against 0.871 at 32 keys (mixed 512 + 64 decodes 0.178 against 0.187). An
# fp8 cache widens its tiles in registers: compiled for sm_90 (Triton 3.6), those launches spill (255 registers),
# 8 warps at 32 keys, 16-row prefill tiles do not (214-217 registers).
DECODE_TILES = _env_ints("TREADLE_MLA_DECODE", "32,4,2")
PREFILL_TILES = _env_ints("TREADLE_MLA_PREFILL", "32,64,8,2")
FP8_DECODE_TILES = _env_ints("TREADLE_MLA_FP8_DECODE", "32,8,2")
FP8_PREFILL_TILES = _env_ints("TREADLE_MLA_FP8_PREFILL", "16,32,8,2")
HEADS_PER_PROGRAM = 16  # query heads a program attends (16 rows: one decode token of 16 heads)


def applies(
    kv_cache: torch.Tensor, sliding_window: int | None, soft_cap: float | None, sinks: object
) -> bool:
    """Whether this call takes the latent path (module docstring)."""
    shared = kv_cache.stride(0) == 0 and kv_cache.shape[3] == 1
    return _ENABLED and shared and sliding_window is None and soft_cap is None and sinks is None


def split_head(head_dim: int) -> tuple[int, int, int]:
    """(MAIN, TAIL, TAIL_PAD): the largest power of two <= head_dim, the rest, and the rest padded (>= 16)."""
    main = next_pow2(head_dim)
    main = main if main == head_dim else main // 2
    tail = head_dim - main
    return main, tail, max(16, next_pow2(tail))


def latent_config(
    profile: DeviceProfile,
    num_reqs: int,
    max_query_len: int,
    num_heads: int,
    force_num_splits: int | None,
    fp8_cache: bool = False,
) -> tuple[LaunchConfig, int]:
    """The launch for a batch shape and the query heads a program takes."""
    heads = min(HEADS_PER_PROGRAM, next_pow2(num_heads))
    blocks = -(-num_heads // heads)
    cfg = choose_launch_config(profile, num_reqs, max_query_len, blocks, heads, force_num_splits)
    if not profile.gpu_tiles:
        return cfg, heads
    if cfg.block_m <= max(16, heads):
        block_n, warps, stages = FP8_DECODE_TILES if fp8_cache else DECODE_TILES
        return dataclasses.replace(cfg, block_n=block_n, num_warps=warps, num_stages=stages), heads
    rows, block_n, warps, stages = FP8_PREFILL_TILES if fp8_cache else PREFILL_TILES
    block_m = max(rows, heads)
    return dataclasses.replace(cfg, block_m=block_m, block_q=block_m // heads, block_n=block_n, num_warps=warps,
                               num_stages=stages), heads  # fmt: skip


def _launch(
    query: torch.Tensor,
    cache: torch.Tensor,  # [num_blocks, block_size, 1, D]
    md: AttentionMetadata,
    output: torch.Tensor,
    scale: float,
    cfg: LaunchConfig,
    heads: int,
    q_len_range: tuple[int, int],
    serves_all: bool,
) -> None:
    from treadle_kernels.attention.triton_mla_kernel import (
        latent_attention_kernel,
        reduce_latent_splits_kernel,
    )

    num_tokens, num_reqs = md.num_actual_tokens, md.num_reqs
    num_heads, head_dim = query.shape[1], query.shape[2]
    main, tail, tail_pad = split_head(head_dim)
    grid = (num_tokens // cfg.block_q + num_reqs, -(-num_heads // heads), cfg.num_splits)
    target, part_m, part_l, (stride_t, stride_h, stride_s) = split_scratch(output, num_tokens, cfg.num_splits,
                                                                           head_dim)  # fmt: skip
    launch(
        latent_attention_kernel, grid,
        target, part_m, part_l, query, cache, md.block_table, md.seq_lens, md.query_start_loc,
        num_reqs, q_len_range[0], q_len_range[1], num_heads, scale,
        query.stride(0), query.stride(1), stride_t, stride_h, stride_s, cache.stride(0), cache.stride(1),
        md.block_table.stride(0),
        MAIN=main, TAIL=tail, TAIL_PAD=tail_pad, HEADS=heads, BLOCK_SIZE=cache.shape[1], BLOCK_Q=cfg.block_q,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_SPLITS=cfg.num_splits, CAUSAL=md.causal,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=query.device.type == "cpu",  # CPU means the interpreter
        WIDE_OFFSETS=wide_offsets(cache, cache), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.num_splits > 1:
        launch(
            reduce_latent_splits_kernel, (num_tokens, num_heads),
            output, target, part_m, part_l, md.query_start_loc, num_reqs, q_len_range[0], q_len_range[1],
            num_heads, output.stride(0), output.stride(1),
            MAIN=main, TAIL=tail, TAIL_PAD=tail_pad, NUM_SPLITS=cfg.num_splits, FILTER=not serves_all, num_warps=4,
        )  # fmt: skip


def latent_attention(
    query: torch.Tensor,  # [T, nh, D], last dim contiguous
    kv_cache: torch.Tensor,  # the stride-0 [2, num_blocks, block_size, 1, D] view
    md: AttentionMetadata,
    output: torch.Tensor,  # [T, nh, D]
    scale: float,
    profile: DeviceProfile,
    min_query_len: int,
    force_num_splits: int | None = None,
) -> torch.Tensor:
    """Attend ``query`` over the shared cache (new vectors already written)."""
    num_heads, fp8 = query.shape[1], kv_cache.dtype in FP8_KV_CACHE_DTYPES
    cfg, heads = latent_config(profile, md.num_reqs, md.max_query_len, num_heads, force_num_splits, fp8)
    short, _ = latent_config(profile, md.num_reqs, 1, num_heads, 1, fp8)
    args = (query, kv_cache[0], md, output, scale)
    if cfg.block_m > short.block_m and min_query_len <= short.block_q:
        # mixed batch: short queries (decodes) in small tiles, long ones (prefills) in large tiles
        _launch(*args, short, heads, (0, short.block_q), False)
        _launch(*args, cfg, heads, (short.block_q + 1, md.max_query_len), False)
    else:
        _launch(*args, cfg, heads, (0, md.max_query_len), True)
    return output
