"""The paged KV cache: which layers form which group, what one block costs, how many blocks fit, the tensors.

Groups. Layers with the same attention kind (full, or a sliding window of one size) form a KV-cache group; the
engine keeps one block table per group per request (a sliding group may drop blocks that left the window).
Full attention comes first, then sliding windows by size. Gemma 3 has two groups; Llama one.

One pool. Block ids are shared by all groups: every layer gets a tensor of `num_blocks` blocks in its
backend's shape (torch/triton: [2, num_blocks, block_size, nkv, head_size]), and a block id, owned by one group
at a time, indexes that group's layers. So one block costs `bytes_per_block` = the sum over all layers.
A layer whose key and value are one vector (`Attention.shares_kv`: DeepSeek's MLA latent) holds it once: one
tensor [num_blocks, block_size, nkv, head_size], handed to the backend as a stride-0 view of the backend's
[2, ...] shape (kv_cache[0] and kv_cache[1] are the same memory), and counted once in `bytes_per_block`.
Block 0 is the null block: never handed out, read by padding. The cache's dtype is CacheConfig.kv_cache_dtype
(`resolve_kv_cache_dtype`: auto = the model dtype; fp8 = 1 byte a value, half a bf16 block's bytes).

Capacity. CPU: `kv_cache_space` GiB, at most what max_num_seqs full-length requests could ever use.
GPU: gpu_memory_utilization × total − (memory in use after loading weights) − peak activations of a profiling
forward pass at max_num_batched_tokens − what the decode CUDA graphs will take (a two-size capture probe,
runner/graph_memory.py); the runner measures both. `num_gpu_blocks_override` wins everywhere.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from treadle_model_runner.kv_cache_spec import KVCacheConfig, KVCacheGroupSpec
from treadle_model_runner.layers.attention import Attention

logger = logging.getLogger(__name__)

_GiB = 1 << 30


_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, backend: Any) -> torch.dtype:
    """The cache's torch dtype for CacheConfig.kv_cache_dtype (auto = the model dtype), checked against the backend."""
    if name == "auto":
        return model_dtype
    if name not in _FP8:
        raise ValueError(f"kv_cache_dtype {name!r} is not one of auto, {', '.join(_FP8)}")
    if not getattr(backend, "supports_fp8_kv_cache", False):
        raise ValueError(
            f"kv_cache_dtype {name!r} is not supported by the {backend.name!r} attention backend; use "
            "another --attention-backend (triton, flashinfer and torch read fp8 caches), or --kv-cache-dtype auto"
        )
    return _FP8[name]


def kv_cache_groups(layers: list[Attention]) -> tuple[KVCacheGroupSpec, ...]:
    """Group layers by sliding window: full attention first, then windows ascending."""
    windows = sorted({a.sliding_window for a in layers}, key=lambda w: (w is not None, w or 0))
    return tuple(
        KVCacheGroupSpec(tuple(a.layer_idx for a in layers if a.sliding_window == w), w) for w in windows
    )


def bytes_per_block(layers: list[Attention], block_size: int, dtype: torch.dtype, backend: Any) -> int:
    """Bytes one block costs across every layer (keys and values)."""
    elem = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for a in layers:
        shape = _stored_shape(a, backend.get_kv_cache_shape(1, block_size, a.num_kv_heads, a.head_size))
        numel = 1
        for dim in shape:
            numel *= dim
        total += numel * elem
    return total


def _stored_shape(layer: Attention, shape: tuple[int, ...]) -> tuple[int, ...]:
    """What a layer's cache of the backend's `shape` stores: one of the [2, ...] halves when K and V are one."""
    if not layer.shares_kv:
        return tuple(shape)
    assert shape[0] == 2, f"a shared key/value cache needs the [2, ...] layout, the backend's is {shape}"
    return tuple(shape[1:])


def max_useful_blocks(num_groups: int, max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks that max_num_seqs requests of max_model_len tokens could hold at once (plus the null block)."""
    return num_groups * max_num_seqs * -(-max_model_len // block_size) + 1


def cpu_num_blocks(kv_cache_space_gib: float, block_bytes: int, useful: int) -> int:
    blocks = int(kv_cache_space_gib * _GiB) // block_bytes
    if blocks > useful:
        logger.info("KV cache: %d blocks fit in %.2f GiB; allocating the %d that can be used", blocks,
                    kv_cache_space_gib, useful)  # fmt: skip
        blocks = useful
    return blocks


def gpu_num_blocks(
    utilization: float, total_bytes: int, used_bytes: int, peak_activation_bytes: int, block_bytes: int
) -> int:
    budget = int(utilization * total_bytes) - used_bytes - peak_activation_bytes
    if budget < 2 * block_bytes:
        raise ValueError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization ({utilization}) × total "
            f"({total_bytes / _GiB:.2f} GiB) minus memory in use ({used_bytes / _GiB:.2f} GiB, weights included) "
            f"minus peak activations ({peak_activation_bytes / _GiB:.2f} GiB) is {budget / _GiB:.2f} GiB; raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens, or use a smaller model"
        )
    return budget // block_bytes


def allocate_kv_caches(
    layers: list[Attention],
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    backend: Any,
) -> list[torch.Tensor]:
    """One tensor per layer, in the backend's shape: zeroed on a GPU, else uninitialised except the null block.

    On CPU, not zero-filling saves seconds at start-up (4 GiB): the CPU backends never read a slot at or past a
    request's seq_len (they are tested on caches poisoned with NaN), and padding reads only the null block. A GPU
    zeroes 100 GiB in well under a second, and XQA (treadle_kernels/attention/xqa.py) reads whole pages past
    seq_len, masking their scores: a weight of 0 times a NaN there (an uninitialised fp8 byte can be one) would
    be NaN, so those slots must hold finite values (later writes are saturating casts: finite)."""
    caches = []
    for a in layers:
        shape = backend.get_kv_cache_shape(num_blocks, block_size, a.num_kv_heads, a.head_size)
        cache = torch.empty(_stored_shape(a, shape), dtype=dtype, device=device)
        # a shared key/value cache: [num_blocks, ...] once, which the backend reads as K and as V
        if a.shares_kv:
            if torch.device(device).type != "cuda":
                cache[0].zero_()
            else:
                cache.zero_()
            cache = cache.unsqueeze(0).expand(shape)
        elif torch.device(device).type != "cuda" and len(shape) > 1 and shape[1] == num_blocks:
            cache[:, 0].zero_()  # CPU, [2, num_blocks, ...]: the null block only
        else:  # a GPU, or a layout this function does not know: all of it
            cache.zero_()
        caches.append(cache)
    return caches


def make_kv_cache_config(
    layers: list[Attention], num_blocks: int, block_size: int, block_bytes: int
) -> KVCacheConfig:
    config = KVCacheConfig(num_blocks, block_size, kv_cache_groups(layers), block_bytes)
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens per sequence across %d group(s)), %.2f GiB",
        num_blocks, block_size, config.num_tokens, len(config.groups), num_blocks * block_bytes / _GiB,
    )  # fmt: skip
    return config
