"""Triton provider for ``reshape_and_cache``: write new K/V into the paged caches through the slot mapping.

key/value [T, kv_heads, head_size] with unit-stride head_size (token and head strides are free, so slices
of a fused qkv buffer work); caches [num_blocks, block_size, kv_heads, head_size] with unit-stride last dim
(e.g. ``kv_cache[0]`` of a [2, ...] buffer). Negative slots are skipped inside the kernel. An fp8 cache is
written at unit scale, saturating at the format's largest finite value (the IR op's semantics).
"""

from __future__ import annotations

import torch

from treadle_ir import ops
from treadle_ir.ops.cache import FP8_KV_CACHE_DTYPES

from .launch import launch
from .support import FLOAT_DTYPES, check_tensor, next_pow2, triton_supported

__all__ = ["register"]

_CACHE_DTYPES = FLOAT_DTYPES | frozenset(FP8_KV_CACHE_DTYPES)  # what a cache may hold (checked on every call)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    from . import cache_kernels

    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    heads_block, dim_block = next_pow2(num_kv_heads), next_pow2(head_size)
    launch(
        cache_kernels.reshape_and_cache_kernel,
        (num_tokens,),
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        num_kv_heads,
        head_size,
        key_cache.shape[1],
        HEADS_BLOCK=heads_block,
        DIM_BLOCK=dim_block,
        FP8_MAX=fp8_max(key_cache.dtype),
        INTERPRETED=key.device.type == "cpu",
        num_warps=min(max(heads_block * dim_block // 256, 1), 8),
    )


def fp8_max(cache_dtype: torch.dtype) -> float:
    """The saturation bound of an fp8 cache dtype; 0.0 (no clamp) for any other dtype."""
    return float(torch.finfo(cache_dtype).max) if cache_dtype in FP8_KV_CACHE_DTYPES else 0.0


def _check(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool | str:
    for name, t, dtypes in (("key", key, FLOAT_DTYPES), ("value", value, FLOAT_DTYPES),
                            ("key_cache", key_cache, _CACHE_DTYPES), ("value_cache", value_cache, _CACHE_DTYPES)):  # fmt: skip
        if (reason := check_tensor(t, name, dtypes)) is not None:
            return reason
    if (
        reason := check_tensor(slot_mapping, "slot_mapping", frozenset({torch.int64, torch.int32}))
    ) is not None:
        return reason
    return shapes_reason(key, value, key_cache, value_cache, slot_mapping) or True


def shapes_reason(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> str | None:
    """Why these shapes are not the op's (None: they are); shared by the Triton and CPU providers."""
    if key.dim() != 3 or value.shape != key.shape:
        return (
            f"key/value must both be [T, kv_heads, head_size], got {tuple(key.shape)} / {tuple(value.shape)}"
        )
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or key_cache.shape[2:] != key.shape[1:]:
        return f"caches {tuple(key_cache.shape)} do not match [blocks, block_size, {key.shape[1]}, {key.shape[2]}]"
    if slot_mapping.shape[0] != key.shape[0]:
        return f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens"
    return None


def register(provider: str = "triton") -> None:
    """Register the Triton KV-cache write provider under ``provider``."""
    ops.reshape_and_cache.register_impl(
        provider, supported=triton_supported, supports_args=_check, batch_invariant=True
    )(reshape_and_cache)
