"""The ``triton`` attention backend: one unified paged kernel (``triton_kernel.py``) for every batch shape.

Each launch's tiles, split count and kernel variant come from ``triton_launch.py`` (host integers only, no device
sync); a mixed batch is launched twice, 16-row tiles for its short queries and 64-row tiles for its long ones (the
builder records the step's shortest query). Decode-only steps over an e4m3 cache on Hopper take FlashInfer's
XQA kernel instead, where flashinfer-python is installed (``xqa.py``), unless the layer has attention sinks
(gpt-oss): every Triton path (unified, split-KV reduction, fused decode) folds those in; XQA is called without.
A shared key/value cache (MLA's latent) takes its own kernel, the head cut into a power-of-two part and a tail and
each key tile loaded once for both dots (``triton_mla.py``), instead of the unified kernel's padded head.

Triton is imported lazily: importing this module never needs it. Under ``TRITON_INTERPRET=1`` the same kernel runs
on CPU tensors (tests), with small tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from treadle_ir.ops.cache import FP8_KV_CACHE_DTYPES
from treadle_kernels.attention import triton_mla, xqa
from treadle_kernels.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    Rope,
    write_kv_cache,
)
from treadle_kernels.attention.metadata import AttentionMetadata
from treadle_kernels.attention.triton_decode import (
    FUSED_MAX_PROGRAMS,
    fusable,
    fused_decode_attention,
    new_counters,
)
from treadle_kernels.attention.triton_launch import (
    DeviceProfile,
    LaunchConfig,
    choose_launch_config,
    device_profile,
    split_scratch,
    wide_head_config,
    wide_offsets,
)
from treadle_kernels.ops.launch import launch
from treadle_kernels.ops.support import next_pow2

logger = logging.getLogger(__name__)


@dataclass
class TritonAttentionMetadata:
    """The common metadata plus the shortest query of the step (decides the mixed-batch double launch)."""

    common: AttentionMetadata
    min_query_len: int  # tokens of the shortest query this step
    counters: torch.Tensor  # the fused decode kernel's split-reduction tickets (triton_decode.py)
    xqa_workspace: torch.Tensor | None = None  # XQA's zeroed workspace (xqa.py); None: XQA off


class TritonMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, block_size: int, device: torch.device | str) -> None:
        super().__init__(block_size, device)
        self.counters = new_counters(self.device)  # before any graph capture; shared by every layer
        self.xqa_workspace = xqa.new_workspace(self.device)

    def build(self, common: AttentionMetadata) -> TritonAttentionMetadata:
        qsl = common.query_start_loc_cpu
        min_query_len = int((qsl[1:] - qsl[:-1]).min()) if qsl.shape[0] > 1 else 0
        return TritonAttentionMetadata(common, min_query_len, self.counters, self.xqa_workspace)


def _launch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    output: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    cfg: LaunchConfig,
    q_len_range: tuple[int, int],
    serves_all: bool,
    sinks: torch.Tensor | None,
) -> None:
    """One kernel launch over the requests with ``q_len_range[0] <= query_len <= q_len_range[1]`` (+ the reduction).

    ``serves_all``: that range holds every request, so every scratch row is written and the reduction need not
    look up each token's request. ``sinks`` [nh] (or None): folded in by the kernel, or with splits by the reduction.
    """
    from treadle_kernels.attention.triton_kernel import paged_attention_kernel, reduce_splits_kernel

    num_tokens, num_reqs = md.num_actual_tokens, md.num_reqs
    num_heads, head_dim = query.shape[1], query.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    head_dim_pad = max(16, next_pow2(head_dim))
    # without sinks any tensor stands in for them: HAS_SINKS is False and the kernels never read it
    sinks_arg = output if sinks is None else sinks
    grid = (num_tokens // cfg.block_q + num_reqs, num_kv_heads, cfg.num_splits)
    # with splits: [T, nh, splits, d_pad] fp32 partial accumulators + [T, nh, splits] running max / sum
    target, part_m, part_l, (stride_t, stride_h, stride_s) = split_scratch(output, num_tokens, cfg.num_splits,
                                                                           head_dim_pad)  # fmt: skip
    launch(
        paged_attention_kernel, grid,
        target, part_m, part_l, query, k_cache, v_cache, md.block_table, md.seq_lens, md.query_start_loc,
        sinks_arg, num_reqs, q_len_range[0], q_len_range[1], scale, logits_soft_cap or 0.0, sliding_window or 0,
        query.stride(0), query.stride(1), stride_t, stride_h, stride_s,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        md.block_table.stride(0),
        G=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_SPLITS=cfg.num_splits,
        CAUSAL=md.causal, USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=query.device.type == "cpu",  # CPU means the interpreter
        WIDE_OFFSETS=wide_offsets(k_cache, v_cache),
        FP8_WIDEN=cfg.fp8_widen if query.device.type == "cuda" else 0,  # inline assembly: never interpreted
        SCORE_MASK_ALWAYS=cfg.mask_all_tiles, HAS_SINKS=sinks is not None and cfg.num_splits == 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.max_registers} if cfg.max_registers and query.device.type == "cuda" else {}),
    )  # fmt: skip
    if cfg.num_splits > 1:
        launch(
            reduce_splits_kernel, (num_tokens, num_heads),
            output, target, part_m, part_l, md.query_start_loc, sinks_arg, num_reqs, q_len_range[0],
            q_len_range[1], num_heads, output.stride(0), output.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=cfg.num_splits, FILTER=not serves_all,
            HAS_SINKS=sinks is not None, num_warps=4,
        )  # fmt: skip


def paged_attention(
    query: torch.Tensor,  # [T, nh, d]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, nkv, d]
    md: AttentionMetadata,
    output: torch.Tensor,  # [T, nh, d]
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    force_num_splits: int | None = None,
    min_query_len: int = 1,
    profile: DeviceProfile | None = None,
    sinks: torch.Tensor | None = None,  # [nh] sink logits (gpt-oss), read as float32
) -> torch.Tensor:
    """Attend ``query`` over the paged cache (new K/V already written) with the unified Triton kernel."""
    if md.num_actual_tokens == 0 or md.num_reqs == 0:
        return output
    if query.stride(-1) != 1:
        query = query.contiguous()
    profile = profile or device_profile(query.device)
    if triton_mla.applies(kv_cache, sliding_window, logits_soft_cap, sinks):
        return triton_mla.latent_attention(query, kv_cache, md, output, scale, profile, min_query_len,
                                           force_num_splits)  # fmt: skip
    num_kv_heads = kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    args = (query, kv_cache, md, output, scale, sliding_window, logits_soft_cap)
    fp8 = kv_cache.dtype in FP8_KV_CACHE_DTYPES
    cfg = choose_launch_config(
        profile, md.num_reqs, md.max_query_len, num_kv_heads, group, force_num_splits, fp8
    )
    short = choose_launch_config(profile, md.num_reqs, 1, num_kv_heads, group, 1, fp8)
    head_dim_pad = max(16, next_pow2(query.shape[2]))
    cfg = wide_head_config(cfg, profile, head_dim_pad, group, md.max_query_len)
    short = wide_head_config(short, profile, head_dim_pad, group, 1)
    if cfg.block_m > short.block_m and min_query_len <= short.block_q:
        # mixed batch: short queries (decodes) in small tiles, long ones (prefills) in large tiles
        _launch(*args, short, (0, short.block_q), False, sinks)
        _launch(*args, cfg, (short.block_q + 1, md.max_query_len), False, sinks)
    else:
        _launch(*args, cfg, (0, md.max_query_len), True, sinks)
    return output


class TritonAttentionImpl(AttentionImpl):
    force_num_splits: int | None = None  # tests: force the split-KV path (power of two)
    device_profile: DeviceProfile | None = None  # tests: launch as on this device (None: the query's device)
    # tests: run the fused decode kernel at larger batches
    fused_decode_max_programs: int = FUSED_MAX_PROGRAMS

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TritonAttentionMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        md = attn_metadata.common
        write_kv_cache(key, value, kv_cache, md.slot_mapping)
        workspace = attn_metadata.xqa_workspace
        # XQA is called without sinks, nor over a shared key/value cache (stride 0): such layers stay on Triton's
        shared_kv = kv_cache.stride(0) == 0
        if self.sinks is None and not shared_kv and xqa.applies(query, kv_cache, md, self.sliding_window,
                                                                 self.logits_soft_cap, workspace):  # fmt: skip
            assert workspace is not None
            try:
                return xqa.decode(query, kv_cache, md, output, self.scale, workspace)
            except xqa.Unavailable:
                pass  # logged; XQA is off from now on
        return paged_attention(
            query, kv_cache, md, output, self.scale, self.sliding_window, self.logits_soft_cap,
            self.force_num_splits, attn_metadata.min_query_len, self.device_profile, self.sinks,
        )  # fmt: skip

    def forward_rope(
        self,
        rope: Rope,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TritonAttentionMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        md = attn_metadata.common
        if not fusable(rope, md, self.head_size, self.logits_soft_cap, query, self.num_kv_heads,
                       self.fused_decode_max_programs):  # fmt: skip
            return super().forward_rope(rope, query, key, value, kv_cache, attn_metadata, output)
        profile = self.device_profile or device_profile(query.device)
        cfg = choose_launch_config(profile, md.num_reqs, 1, self.num_kv_heads, self.num_queries_per_kv,
                                   self.force_num_splits)  # fmt: skip
        return fused_decode_attention(rope, query, key, value, kv_cache, md, output, self.scale,
                                      self.sliding_window, attn_metadata.counters, cfg.num_splits,
                                      cfg.block_n, self.sinks)  # fmt: skip


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_fp8_kv_cache = True
    supports_sinks = True  # every kernel path folds them in (HAS_SINKS); XQA is skipped for such layers
    supports_cuda_graphs = True  # launches read metadata from persistent device tensors only
    # one request: one unified-kernel launch whose programs find their query tiles through query_start_loc
    supports_prefill_graphs = True
    # several requests of 1..Q tokens: the programs number their tiles from query_start_loc on the device, surplus
    # tiles (rows past the last request) exit at once, and the short / long launch split is by each query's length
    supports_batch_graphs = True
    # the kernels take K's and V's strides apart (a stride-0 [2, ...] view aliases them); XQA is skipped for them
    supports_shared_kv = True
    compiles_ahead = True  # every launch is ops.launch.launch (XQA, FlashInfer's, is switched off for it)
    builder_cls = TritonMetadataBuilder
    impl_cls = TritonAttentionImpl
