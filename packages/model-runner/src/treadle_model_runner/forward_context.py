"""The forward context: per-step state that attention layers read without it being threaded through forward().

A model's forward signature stays the math (`model(input_ids, positions)`); the paged-attention layers find their
KV-cache tensor and the backend's attention metadata here. The runner sets the context around each forward
pass (eager, profiling, CUDA-graph capture) with `set_forward_context`; outside one, attention raises.

Invariants: `kv_caches[i]` and `attn_metadata[i]` belong to decoder layer i (layers of one KV-cache group share
one metadata object, built from that group's block table); the context is cleared on exit, exceptions included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class ForwardContext:
    kv_caches: list[torch.Tensor]  # per decoder layer: the backend's KV-cache tensor
    attn_metadata: list[
        Any
    ]  # per decoder layer: the backend's metadata for this step (shared within a group)
    num_actual_tokens: int  # real tokens this step; inputs may be padded beyond it (CUDA graphs)
    # piecewise CUDA-graph capture only: takes each attention layer's call (runner/piecewise.py)
    split_attention: Callable[..., torch.Tensor] | None = None


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    assert _CONTEXT is not None, "attention ran outside set_forward_context(): the runner sets it per step"
    return _CONTEXT


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, context
    try:
        yield context
    finally:
        _CONTEXT = previous
