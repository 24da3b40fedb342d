"""Paged KV-cache write: scatter the new tokens' keys and values into their cache slots.

key/value [T, num_kv_heads, head_size]; key_cache/value_cache [num_blocks, block_size, num_kv_heads,
head_size]; slot_mapping [T] int64 with ``slot = block * block_size + offset``. A negative slot (padding)
is skipped. Values are cast to the cache dtype. Slots of distinct real tokens are distinct (the KV cache
manager guarantees it), so the write order does not matter.

An fp8 cache (``float8_e4m3fn`` / ``float8_e5m2``: ``--kv-cache-dtype fp8``) holds the values at unit scale:
each is clamped to the format's largest finite value, then rounded to nearest even (``to_kv_cache_dtype``);
readers cast it back to the model dtype.

The native implementation has no data-dependent shapes and no host sync (so it is CUDA-graph capturable and
the compile lowering can inline it): a padding token is redirected to repeat the write of the first real
token (same slot, same data), and when there is no real token every row rewrites slot 0 with its own
current contents. Duplicate writes then carry identical data, so their order cannot matter.
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = ["FP8_KV_CACHE_DTYPES", "reshape_and_cache", "to_kv_cache_dtype"]

FP8_KV_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def to_kv_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the cache stores it: a plain cast, or for fp8 a cast that saturates at the largest finite value."""
    if dtype not in FP8_KV_CACHE_DTYPES:
        return x.to(dtype)
    fmax = torch.finfo(dtype).max
    return x.float().clamp(-fmax, fmax).to(dtype)


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = 8, 8, 128, 4, 16
    key = torch.randn(num_tokens, num_kv_heads, head_size, device=device, dtype=dtype)
    cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_size, device=device, dtype=dtype)
    slots = torch.arange(num_tokens, device=device, dtype=torch.int64)
    return key, key.clone(), cache, cache.clone(), slots


def _write(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> None:
    """cache.view(slots)[slots[i]] = rows[i] with padding rows redirected as described above."""
    num_tokens = rows.shape[0]
    flat = cache.view(cache.shape[0] * cache.shape[1], -1)  # [num_slots, kv_heads * head_size]
    data = to_kv_cache_dtype(rows.reshape(num_tokens, -1), cache.dtype)
    if cache.dtype in FP8_KV_CACHE_DTYPES:  # move fp8 bytes as uint8 (index_copy_ has no fp8 kernel on CPU)
        flat, data = flat.view(torch.uint8), data.view(torch.uint8)
    first = torch.argmax(valid.to(torch.int32))  # first real token (0 when there is none); stays on device
    any_valid = valid.any()  # 0-dim bool tensor: no host sync, no data-dependent shape
    source = torch.where(valid, torch.arange(num_tokens, device=rows.device), first)
    target = torch.where(any_valid, slots.index_select(0, source), torch.zeros_like(slots))
    data = torch.where(any_valid, data.index_select(0, source), flat[0].unsqueeze(0).expand_as(data))
    flat.index_copy_(0, target, data)


@op(mutates_args=("key_cache", "value_cache"), example=_example)
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value rows into the paged caches at ``slot_mapping`` (negative slots skipped)."""
    if key.shape[0] == 0:
        return
    valid = slot_mapping >= 0
    _write(key_cache, key, slot_mapping, valid)
    _write(value_cache, value, slot_mapping, valid)
