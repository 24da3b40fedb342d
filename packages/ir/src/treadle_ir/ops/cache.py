"""Paged KV-cache write: scatter the new tokens' keys and values into their cache slots.

key/value [T, num_kv_heads, head_size]; key_cache/value_cache [num_blocks, block_size, num_kv_heads,
head_size]; slot_mapping [T] int64 with ``slot = block * block_size + offset``. A negative slot (padding)
is skipped. Values are cast to the cache dtype. Slots of distinct real tokens are distinct (the KV cache
manager guarantees it), so the write order does not matter.

The native implementation selects valid rows with a data-dependent mask, so it is not inlined by the
compile lowering (``inline_native=False``): the lowered graph calls it as an opaque op.
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = ["reshape_and_cache"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    num_tokens, num_kv_heads, head_size, num_blocks, block_size = 8, 8, 128, 4, 16
    key = torch.randn(num_tokens, num_kv_heads, head_size, device=device, dtype=dtype)
    cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_size, device=device, dtype=dtype)
    slots = torch.arange(num_tokens, device=device, dtype=torch.int64)
    return key, key.clone(), cache, cache.clone(), slots


@op(mutates_args=("key_cache", "value_cache"), example=_example, inline_native=False)
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value rows into the paged caches at ``slot_mapping`` (negative slots skipped)."""
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(num_slots, *key_cache.shape[2:])[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(num_slots, *value_cache.shape[2:])[slots] = value[valid].to(value_cache.dtype)
