"""Paged attention backends: the contract, the per-step metadata and backend selection.

``get_attn_backend(name, device)`` returns a backend class; its builder turns the step's ``AttentionMetadata``
into backend metadata once per step, and one impl per layer writes new K/V through the slot mapping and attends
over the paged cache. Backends: ``torch`` (reference), ``triton`` (unified kernel), ``flashinfer`` (optional).
"""

from __future__ import annotations

from treadle_kernels.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    Rope,
    write_kv_cache,
)
from treadle_kernels.attention.metadata import AttentionMetadata
from treadle_kernels.attention.selector import available_backend_names, get_attn_backend

__all__ = [
    "AttentionBackend",
    "AttentionImpl",
    "AttentionMetadata",
    "AttentionMetadataBuilder",
    "Rope",
    "available_backend_names",
    "get_attn_backend",
    "write_kv_cache",
]
