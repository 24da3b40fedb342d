"""Launch configuration of the unified Triton attention kernel, chosen on the host from integers the metadata
already carries (no device sync):

- tile shape: ``BLOCK_M`` rows = ``BLOCK_Q`` query tokens x ``G`` heads of one KV group; 16 rows when every query
  is short (decode, speculative tails), 64 otherwise (prefill);
- split-KV (flash-decoding): only when every request fits one query tile, and the ``num_reqs x num_kv_heads``
  programs would leave the GPU's SMs idle; the split count depends on the batch shape only (never on context
  lengths), so a CUDA graph captured for a batch size stays correct as contexts grow. In a mixed batch only the
  long-query launch may split, and its reduction touches only the rows of the requests that launch served;
- the kernel variant: key tile, warps and stages, where fp8 tiles widen, cache offset width.

The heuristics read the device through a ``DeviceProfile`` (GPU tiles or not, SM count, fp8 conversions); tests
inject a GPU's profile (``H100_PROFILE``) so the interpreter runs exactly the launches that GPU would.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from treadle_kernels.ops.support import next_pow2, num_sms

_MAX_SPLITS = 16  # most KV segments per (request, KV head) on the split-KV path
# The fp8-cache launch, from one Llama-3.1-8B layer of 256 x 1.5k-token decodes on an H200
# (results/gpu-fp8-widen-h200-a4b8e69, calls 1 and 2; ms): 0.371 as it was (128-key tiles, 64-bit offsets, tiles
# widened inside the dot); 32-bit offsets 0.322; + the value tile widened after its load (FP8_WIDEN=1) 0.326, at
# 64-key tiles 0.304 (the default; end to end 11,173 against 10,413 output tok/s, same machine); both tiles widened
# 0.407 (64 keys 0.447); at 64 keys without the widening 0.374, 3 stages 0.371, 2 warps 0.331, 8 warps 0.467;
# 32-key tiles 0.396; then the loop without masks (triton_kernel.py) 0.302 -> 0.282 (call 4). sm_90 SASS
# (sass_stats.py): 1,387 key-loop instructions per 128 keys as it was, 886 with these, 720 in the unmasked loop.
# 32-bit cache offsets where a layer's cache allows them: "1" or unset, "0" never. First for fp8 caches only (bf16
# decode at 64-key tiles measured slower with them, 0.408 against 0.378 ms, before the unmasked key loop); on the
# unmasked loop, with a bf16 cache on an H200 (results/gpu-pdl-cap-h200-381f3dc, call 2; ms, 64- / 32-bit): prefill
# 4 x 2048 0.567 / 0.418, an 8192-token chunk on 8192 cached 5.49 / 3.99, mixed 1 x 1024 + 64 decodes 0.200 /
# 0.188, decodes b256 ctx1536 0.392 / 0.392, b64 ctx4096 0.248 / 0.247; so they are the default for every cache
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
    mask_all_tiles: bool = False  # every key tile through the masked loop (TREADLE_ATTN_MASK_ALL_TILES)


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
    small_rows = max(16, next_pow2(group))
    if max_query_len * group <= small_rows:
        block_m = small_rows
    else:
        block_m = max(64 if on_gpu else 32, next_pow2(group))
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
                num_splits = min(_MAX_SPLITS, next_pow2((target + programs - 1) // programs))
    # H200 sweep (benchmarks/attention.py shapes): 4 warps and 2 stages won for decode and prefill alike
    num_warps, num_stages = (_FP8_WARPS, _FP8_STAGES) if fp8_cache else (4, 2)
    widen = _FP8_WIDEN if fp8_cache and profile.fp8_convert else 0
    max_registers = _FP8_MAX_REGISTERS if fp8_cache else 0
    if not on_gpu:
        num_warps, num_stages, max_registers = 4, 1, 0
    return LaunchConfig(block_m, block_q, block_n, num_splits, num_warps, num_stages, widen, max_registers,
                        _MASK_ALL_TILES)  # fmt: skip


# head dims (padded to a power of two) above which a GPU launch takes `wide_head_config`'s tiles
WIDE_HEAD_DIM = 256


def wide_head_config(
    cfg: LaunchConfig, profile: DeviceProfile, head_dim_pad: int, group: int, max_query_len: int
) -> LaunchConfig:
    """The launch for heads wider than WIDE_HEAD_DIM on a GPU (MLA's 576-wide latent heads, padded to 1024, where
    ``TREADLE_ATTN_MLA=0`` keeps them off the latent kernel, triton_mla.py; interpreter tiles are small already): one query row per head of the group (16 rows at most 16 heads), 16-key tiles, one
    stage, 8 warps. Compiled for sm_90 (kernels tests/compile_sm90.py) the default 64-key, 2-stage decode tile of a
    1024-wide head needs 288 KB of shared memory, past Hopper's 227 KB; this one 96 KB, 182 registers, no spills. A
    split count stays where every query still fits one tile (decodes), so decode graphs keep theirs."""
    if not profile.gpu_tiles or head_dim_pad <= WIDE_HEAD_DIM:
        return cfg
    block_m = max(16, next_pow2(group))
    block_q = max(1, block_m // group)
    num_splits = cfg.num_splits if max_query_len <= block_q else 1
    return dataclasses.replace(cfg, block_m=block_m, block_q=block_q, block_n=16, num_splits=num_splits,
                               num_warps=8, num_stages=1)  # fmt: skip


def split_scratch(
    output: torch.Tensor, num_tokens: int, num_splits: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Where a launch writes ``(target, running max, running sum, target's (token, head, split) strides)``: without
    splits the output itself (the max and sum never written); with them fp32 partial accumulators
    ``[T, nh, splits, width]`` and ``[T, nh, splits]`` maxima and sums for the reduction."""
    if num_splits == 1:
        return output, output, output, (output.stride(0), output.stride(1), 0)
    num_heads, device = output.shape[1], output.device
    target = torch.empty(num_tokens, num_heads, num_splits, width, dtype=torch.float32, device=device)
    part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=device)
    return target, part_m, torch.empty_like(part_m), (target.stride(0), target.stride(1), target.stride(2))


def extent(t: torch.Tensor) -> int:
    """One past the largest element offset a view reaches from its first element (its numel when contiguous)."""
    return (
        1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        if t.numel()
        else 0
    )


def wide_offsets(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel computes cache offsets in 64 bits: when an element offset into this layer's K or V cache
    reaches 2**31, or always with ``TREADLE_ATTN_NARROW_OFFSETS=0``."""
    narrow = True if _NARROW_OFFSETS is None else _NARROW_OFFSETS
    return not narrow or max(extent(k_cache), extent(v_cache)) >= 2**31
