"""The ``triton`` attention backend: one unified paged kernel (``triton_kernel.py``) for every batch shape.

Launch configuration is chosen on the host from integers the metadata already carries (no device sync):

- tile shape: ``BLOCK_M`` rows = ``BLOCK_Q`` query tokens x ``G`` heads of one KV group; 16 rows when every query
  is short (decode, speculative tails), 64 otherwise (prefill); a mixed batch is launched twice, 16-row tiles for
  its short queries and 64-row tiles for its long ones (the builder records the step's shortest query);
- split-KV (flash-decoding): only when every request fits one query tile, and the ``num_reqs x num_kv_heads``
  programs would leave the GPU's SMs idle; the split count depends on the batch shape only (never on context
  lengths), so a CUDA graph captured for a batch size stays correct as contexts grow. In a mixed batch only the
  long-query launch may split, and its reduction touches only the rows of the requests that launch served.

The heuristics read the device through a ``DeviceProfile`` (GPU tiles or not, SM count); tests inject a GPU's
profile (``H100_PROFILE``) so the interpreter runs exactly the launches that GPU would.

Triton is imported lazily: importing this module never needs it. Under ``TRITON_INTERPRET=1`` the same kernel runs
on CPU tensors (tests), with small tiles.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

from treadle_ir.ops.cache import FP8_KV_CACHE_DTYPES
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
from treadle_kernels.ops.support import num_sms

logger = logging.getLogger(__name__)

_MAX_SPLITS = 16  # most KV segments per (request, KV head) on the split-KV path
# The fp8-cache launch, from one Llama-3.1-8B layer of 256 x 1.5k-token decodes on an H200
# (results/gpu-fp8-widen-h200-a4b8e69, calls 1 and 2; ms): 0.371 as it was (128-key tiles, 64-bit offsets, tiles
# widened inside the dot); 32-bit offsets 0.322; + the value tile widened after its load (FP8_WIDEN=1) 0.326, at
# 64-key tiles 0.304 (the default; end to end 11,173 against 10,413 output tok/s, same machine); both tiles widened
# 0.407 (64 keys 0.447); at 64 keys without the widening 0.374, 3 stages 0.371, 2 warps 0.331, 8 warps 0.467;
# 32-key tiles 0.396; then the loop without masks (triton_kernel.py) 0.302 -> 0.282 (call 4). sm_90 SASS
# (sass_stats.py): 1,387 key-loop instructions per 128 keys as it was, 886 with these, 720 in the unmasked loop.
# 32-bit cache offsets where a layer's cache allows them: "1" always, "0" never, unset: for fp8 caches (bf16 at
# 64-key tiles measured slower with them, 0.408 against 0.378 ms)
_NARROW_OFFSETS: bool | None = {"1": True, "0": False}.get(os.environ.get("TREADLE_ATTN_NARROW_OFFSETS", ""))
# keys per tile on a GPU with a 16-bit / an fp8 cache, warps and pipeline stages with an fp8 cache
_BLOCK_N = int(os.environ.get("TREADLE_ATTN_BLOCK_N", "64"))
_FP8_BLOCK_N = int(os.environ.get("TREADLE_ATTN_FP8_BLOCK_N", "64"))
_FP8_WARPS = int(os.environ.get("TREADLE_ATTN_FP8_WARPS", "4"))
_FP8_STAGES = int(os.environ.get("TREADLE_ATTN_FP8_STAGES", "2"))
# where an fp8 cache's tiles widen to fp16 (triton_kernel.py, FP8_WIDEN): 0 in the dot (Triton), 1 the value tile
# after its load, 2 both tiles
_FP8_WIDEN = int(os.environ.get("TREADLE_ATTN_FP8_WIDEN", "1"))
# register cap of an fp8 launch on a GPU (0: ptxas decides) and masking every key tile, as before the unmasked loop
_FP8_MAX_REGISTERS = int(os.environ.get("TREADLE_ATTN_FP8_MAXNREG", "0"))
_MASK_ALL_TILES = os.environ.get("TREADLE_ATTN_MASK_ALL_TILES") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and split count of one kernel launch."""

    block_m: int  # query rows per program (BLOCK_Q tokens x G heads, padded to a power of two)
    block_q: int  # query tokens per program
    block_n: int  # keys per inner-loop iteration
    num_splits: int  # KV segments per program row (1 = no split-KV)
    num_warps: int
    num_stages: int
    fp8_widen: int = 0  # FP8_WIDEN of the launch (0 unless an fp8 cache on a GPU with fp8 conversions)
    max_registers: int = 0  # ptxas register cap per thread (0: none)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclass(frozen=True)
class DeviceProfile:
    """The device facts the launch heuristics read (injectable: tests run a GPU's launches on the interpreter)."""

    # GPU tiles (64-row prefill tiles, 64-key blocks, 2 stages); False: small interpreter tiles
    gpu_tiles: bool
    num_sms: int  # streaming multiprocessors the split-KV heuristic fills; 0 = never split unless forced
    fp8_convert: bool = False  # the device converts fp8 pairs to fp16 in one instruction (sm_89+)


H100_PROFILE = DeviceProfile(gpu_tiles=True, num_sms=132, fp8_convert=True)
_CPU_PROFILE = DeviceProfile(gpu_tiles=False, num_sms=0)


@functools.cache
def _cuda_profile(device_index: int) -> DeviceProfile:
    capability = torch.cuda.get_device_capability(device_index)
    return DeviceProfile(True, num_sms(device_index), fp8_convert=capability >= (8, 9))


def device_profile(device: torch.device) -> DeviceProfile:
    """The profile of a real device: CUDA devices report their SM count, anything else runs the interpreter."""
    if device.type != "cuda":
        return _CPU_PROFILE
    return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())


def choose_launch_config(
    profile: DeviceProfile,
    num_reqs: int,
    max_query_len: int,
    num_kv_heads: int,
    group: int,
    force_num_splits: int | None = None,
    fp8_cache: bool = False,
) -> LaunchConfig:
    """Pick tile sizes and the split count for a batch shape (host integers only)."""
    on_gpu = profile.gpu_tiles
    small_rows = max(16, _next_pow2(group))
    if max_query_len * group <= small_rows:
        block_m = small_rows
    else:
        block_m = max(64 if on_gpu else 32, _next_pow2(group))
    block_q = max(1, block_m // group)
    # H200: a bf16 cache reads 64-key tiles faster (399 against 418 us at 256 x 1.5k-token decodes,
    # results/gpu-fp8-kv-h200-bb1aa9d); an fp8 cache too, once its value tile widens after the load (above)
    block_n = (_FP8_BLOCK_N if fp8_cache else _BLOCK_N) if on_gpu else 16
    num_splits = 1
    if max_query_len <= block_q:
        if force_num_splits is not None:
            num_splits = force_num_splits
        elif profile.num_sms > 0:
            programs = num_reqs * num_kv_heads
            target = 2 * profile.num_sms
            if programs < target:
                num_splits = min(_MAX_SPLITS, _next_pow2((target + programs - 1) // programs))
    # H200 sweep (benchmarks/attention.py shapes): 4 warps and 2 stages won for decode and prefill alike
    num_warps, num_stages = (_FP8_WARPS, _FP8_STAGES) if fp8_cache else (4, 2)
    widen = _FP8_WIDEN if fp8_cache and profile.fp8_convert else 0
    max_registers = _FP8_MAX_REGISTERS if fp8_cache else 0
    if not on_gpu:
        num_warps, num_stages, max_registers = 4, 1, 0
    return LaunchConfig(block_m, block_q, block_n, num_splits, num_warps, num_stages, widen, max_registers)


@dataclass
class TritonAttentionMetadata:
    """The common metadata plus the shortest query of the step (decides the mixed-batch double launch)."""

    common: AttentionMetadata
    min_query_len: int  # tokens of the shortest query this step
    counters: torch.Tensor  # the fused decode kernel's split-reduction tickets (triton_decode.py)


class TritonMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, block_size: int, device: torch.device | str) -> None:
        super().__init__(block_size, device)
        self.counters = new_counters(self.device)  # before any graph capture; shared by every layer

    def build(self, common: AttentionMetadata) -> TritonAttentionMetadata:
        qsl = common.query_start_loc_cpu
        min_query_len = int((qsl[1:] - qsl[:-1]).min()) if qsl.shape[0] > 1 else 0
        return TritonAttentionMetadata(common, min_query_len, self.counters)


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset a view reaches from its first element (its numel when contiguous)."""
    return (
        1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        if t.numel()
        else 0
    )


def _wide_offsets(k_cache: torch.Tensor, v_cache: torch.Tensor, fp8: bool = False) -> bool:
    """Whether the kernel computes cache offsets in 64 bits: always, unless narrowing is on (by default for an
    fp8 cache) and every element offset into this layer's K and V caches stays below 2**31."""
    narrow = fp8 if _NARROW_OFFSETS is None else _NARROW_OFFSETS
    return not narrow or max(_extent(k_cache), _extent(v_cache)) >= 2**31


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
) -> None:
    """One kernel launch over the requests with ``q_len_range[0] <= query_len <= q_len_range[1]`` (+ the reduction).

    ``serves_all``: that range holds every request, so every scratch row is written and the reduction need not
    look up each token's request.
    """
    from treadle_kernels.attention.triton_kernel import paged_attention_kernel, reduce_splits_kernel

    num_tokens, num_reqs = md.num_actual_tokens, md.num_reqs
    num_heads, head_dim = query.shape[1], query.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    head_dim_pad = max(16, _next_pow2(head_dim))
    grid = (num_tokens // cfg.block_q + num_reqs, num_kv_heads, cfg.num_splits)
    if cfg.num_splits == 1:
        target, part_m, part_l = output, output, output
        stride_t, stride_h, stride_s = output.stride(0), output.stride(1), 0
    else:
        # [T, nh, splits, d_pad] fp32 partial accumulators + [T, nh, splits] running max / sum
        target = torch.empty(num_tokens, num_heads, cfg.num_splits, head_dim_pad, dtype=torch.float32,
                             device=query.device)  # fmt: skip
        part_m = torch.empty(num_tokens, num_heads, cfg.num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        stride_t, stride_h, stride_s = target.stride(0), target.stride(1), target.stride(2)
    paged_attention_kernel[grid](
        target, part_m, part_l, query, k_cache, v_cache, md.block_table, md.seq_lens, md.query_start_loc,
        num_reqs, q_len_range[0], q_len_range[1], scale, logits_soft_cap or 0.0, sliding_window or 0,
        query.stride(0), query.stride(1), stride_t, stride_h, stride_s,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        md.block_table.stride(0),
        G=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_SPLITS=cfg.num_splits,
        CAUSAL=md.causal, USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=query.device.type == "cpu",  # CPU means the interpreter
        WIDE_OFFSETS=_wide_offsets(k_cache, v_cache, k_cache.dtype in FP8_KV_CACHE_DTYPES),
        FP8_WIDEN=cfg.fp8_widen if query.device.type == "cuda" else 0,  # inline assembly: never interpreted
        SCORE_MASK_ALWAYS=_MASK_ALL_TILES,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.max_registers} if cfg.max_registers and query.device.type == "cuda" else {}),
    )  # fmt: skip
    if cfg.num_splits > 1:
        reduce_splits_kernel[(num_tokens, num_heads)](
            output, target, part_m, part_l, md.query_start_loc, num_reqs, q_len_range[0], q_len_range[1],
            num_heads, output.stride(0), output.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=cfg.num_splits, FILTER=not serves_all,
            num_warps=4,
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
) -> torch.Tensor:
    """Attend ``query`` over the paged cache (new K/V already written) with the unified Triton kernel."""
    if md.num_actual_tokens == 0 or md.num_reqs == 0:
        return output
    if query.stride(-1) != 1:
        query = query.contiguous()
    num_kv_heads = kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    args = (query, kv_cache, md, output, scale, sliding_window, logits_soft_cap)
    profile = profile or device_profile(query.device)
    fp8 = kv_cache.dtype in FP8_KV_CACHE_DTYPES
    cfg = choose_launch_config(
        profile, md.num_reqs, md.max_query_len, num_kv_heads, group, force_num_splits, fp8
    )
    short = choose_launch_config(profile, md.num_reqs, 1, num_kv_heads, group, 1, fp8)
    if cfg.block_m > short.block_m and min_query_len <= short.block_q:
        # mixed batch: short queries (decodes) in small tiles, long ones (prefills) in large tiles
        _launch(*args, short, (0, short.block_q), False)
        _launch(*args, cfg, (short.block_q + 1, md.max_query_len), False)
    else:
        _launch(*args, cfg, (0, md.max_query_len), True)
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
        return paged_attention(
            query, kv_cache, md, output, self.scale, self.sliding_window, self.logits_soft_cap,
            self.force_num_splits, attn_metadata.min_query_len, self.device_profile,
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
                                      cfg.block_n)  # fmt: skip


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_fp8_kv_cache = True
    supports_cuda_graphs = True  # launches read metadata from persistent device tensors only
    builder_cls = TritonMetadataBuilder
    impl_cls = TritonAttentionImpl
