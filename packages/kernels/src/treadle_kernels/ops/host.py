"""The ``cpu`` provider of ``reshape_and_cache`` and ``rotary_embedding_``: the native specs' math in fewer torch
calls, for tensors in host memory.

The native specs are written to be captured in CUDA graphs (no host sync, no data-dependent shape): the cache
write redirects padding rows with ``argmax`` / ``where`` / ``index_select`` before one ``index_copy_``, and the
rotation builds a rotated copy of each head and copies it back. On the CPU nothing is captured, so here the
cache write drops padding rows by a mask (only when there are any) and copies the rest with one ``index_copy_``
per cache, and the rotation computes the two rotated halves and writes them into place. Both give the spec's
values bit for bit: the same float32 products and sums, rounded once to the tensor's dtype.
"""

from __future__ import annotations

import torch

from treadle_ir import Platform, ops
from treadle_ir.ops.cache import FP8_KV_CACHE_DTYPES, to_kv_cache_dtype

from .cache import shapes_reason as cache_shapes_reason

__all__ = ["PROVIDER", "register"]

PROVIDER = "cpu"
_INDEX_DTYPES = (torch.int64, torch.int32)


def supported(platform: Platform) -> bool | str:
    return True if platform.is_cpu else "host memory only (the Triton provider serves CUDA tensors)"


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if key.shape[0] == 0:
        return
    slots = slot_mapping.long()
    real = slots >= 0
    if not bool(real.all()):  # padding rows (negative slots) are skipped
        slots, key, value = slots[real], key[real], value[real]
    for rows, cache in ((key, key_cache), (value, value_cache)):
        flat = cache.view(cache.shape[0] * cache.shape[1], -1)  # [num_slots, kv_heads * head_size]
        data = to_kv_cache_dtype(rows.flatten(1), cache.dtype)  # [tokens, kv_heads * head_size]
        if cache.dtype in FP8_KV_CACHE_DTYPES:  # index_copy_ has no fp8 kernel on CPU: move the bytes
            flat, data = flat.view(torch.uint8), data.view(torch.uint8)
        flat.index_copy_(0, slots, data)


def rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    cos_sin = cos_sin_cache.index_select(0, positions).float()  # [T, rot_dim]
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]  # broadcast over heads
    for x in (query, key):
        heads = x.unflatten(-1, (-1, head_size)) if x.dim() == 2 else x  # a view: x may be a strided slice
        if is_neox:  # dim i pairs with i + rot_dim / 2
            x1, x2 = heads[..., :half], heads[..., half : 2 * half]
        else:  # dim 2i pairs with 2i + 1
            x1, x2 = heads[..., 0 : 2 * half : 2], heads[..., 1 : 2 * half : 2]
        a, b = x1.float(), x2.float()  # fp32 inputs: the same tensors, so both halves are computed first
        first, second = a * cos - b * sin, b * cos + a * sin
        x1.copy_(first)
        x2.copy_(second)


def _on_host(*tensors: tuple[str, torch.Tensor]) -> str | None:
    for name, t in tensors:
        if t.device.type != "cpu":
            return f"{name} is on {t.device}, not in host memory"
    return None


def _cache_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool | str:
    tensors = (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache))
    if (reason := _on_host(*tensors, ("slot_mapping", slot_mapping))) is not None:
        return reason
    if slot_mapping.dtype not in _INDEX_DTYPES:
        return f"slot_mapping is {slot_mapping.dtype}; expected int64 or int32"
    if (reason := cache_shapes_reason(key, value, key_cache, value_cache, slot_mapping)) is not None:
        return reason
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        return "the caches must be contiguous (each is viewed as [slots, kv_heads * head_size])"
    return True


def _rotary_args(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> bool | str:
    tensors = (("positions", positions), ("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache))
    if (reason := _on_host(*tensors)) is not None:
        return reason
    if positions.dtype not in _INDEX_DTYPES:
        return f"positions is {positions.dtype}; expected int64 or int32"
    if (rot_dim := cos_sin_cache.shape[-1]) % 2 or rot_dim > head_size:
        return f"rot_dim {rot_dim} must be even and <= head_size {head_size}"
    for name, t in (("query", query), ("key", key)):
        if t.dim() not in (2, 3) or t.shape[-1] % head_size or (t.dim() == 3 and t.shape[2] != head_size):
            return f"{name} {tuple(t.shape)} is not [T, heads * {head_size}] or [T, heads, {head_size}]"
        if t.stride(-1) != 1:
            return f"{name} must have a unit-stride last dim (it is rotated in place through a view)"
    return True


def register() -> None:
    """Register the ``cpu`` provider of the KV-cache write and the in-place rotary embedding."""
    ops.reshape_and_cache.register_impl(
        PROVIDER, supported=supported, supports_args=_cache_args, batch_invariant=True
    )(reshape_and_cache)
    ops.rotary_embedding_.register_impl(
        PROVIDER, supported=supported, supports_args=_rotary_args, batch_invariant=True
    )(rotary_embedding_)
