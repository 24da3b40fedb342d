"""Warming the GPU's L2 cache with the weight the next kernel streams: ``l2_prefetched(weight, num_tokens)``.

Why: in a batch-1 decode step a layer's attention reads a few hundred KB over ~7 us while HBM sits idle, and the
o_proj after it then streams its weight (33.5 MB for Llama-3.1-8B) from HBM; the smallest projections run
furthest below the bandwidth ceiling (about 3.2 against 4.1 TB/s on an H200). Requesting the weight into L2 while
attention runs moves part of that read into the idle window:

    with l2_prefetched(o_proj.weight, num_tokens):
        out = attention(q, k, v)
    o_proj(out)

A hint: no value changes. Nothing runs unless the tensor is a contiguous CUDA tensor and the step has at most
``TREADLE_L2_PREFETCH`` tokens (default 0: off). At most the device's L2 size is requested, from the tensor's
start (the projection's first programs read its first rows). By default the prefetch is one launch just before
attention on the same stream, whose programs retire as soon as their requests are issued;
``TREADLE_L2_PREFETCH_STREAM=1`` issues it on a side stream forked from the current one and joins that stream
when the block ends (a CUDA-graph capture records the fork and the join).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from .. import envs

__all__ = ["applies", "l2_prefetched", "launch", "plan"]

LINE_BYTES = 128
LINES_PER_PROGRAM = 2048  # 256 KB a program: ~130 programs for a 33.5 MB weight
BLOCK = 256  # lines requested at once: two per thread at 4 warps


@functools.cache
def _max_tokens() -> int:
    return envs.L2_PREFETCH()


@functools.cache
def _side_stream_on() -> bool:
    return envs.L2_PREFETCH_STREAM()


@functools.cache
def _l2_bytes(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).L2_cache_size)


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def applies(t: torch.Tensor | None, num_tokens: int) -> bool:
    """Whether ``l2_prefetched`` launches anything for ``t`` in a step of ``num_tokens`` tokens."""
    return 0 < num_tokens <= _max_tokens() and t is not None and t.is_cuda and t.is_contiguous()


def plan(nbytes: int, l2_bytes: int) -> tuple[int, int]:
    """(lines, programs) that request the first min(nbytes, l2_bytes) bytes of a tensor of nbytes."""
    lines = -(-min(nbytes, l2_bytes) // LINE_BYTES)
    return lines, -(-lines // LINES_PER_PROGRAM)


def launch(t: torch.Tensor) -> int:
    """Request the first min(t's bytes, L2 size) bytes of ``t`` into L2 on the current stream; returns the lines."""
    from .prefetch_kernels import l2_prefetch_kernel

    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    lines, programs = plan(t.numel() * t.element_size(), _l2_bytes(index))
    if lines:
        l2_prefetch_kernel[(programs,)](
            t, lines, LINE_ELEMS=LINE_BYTES // t.element_size(), LINES_PER_PROGRAM=LINES_PER_PROGRAM,
            BLOCK=BLOCK, num_warps=4,
        )  # fmt: skip
    return lines


@contextlib.contextmanager
def l2_prefetched(t: torch.Tensor | None, num_tokens: int) -> Iterator[None]:
    """Prefetch ``t`` into L2 for the kernels launched inside the block (see the module doc)."""
    if not applies(t, num_tokens):
        yield
        return
    assert t is not None
    if not _side_stream_on():
        launch(t)
        yield
        return
    current = torch.cuda.current_stream(t.device)
    side = _side_stream(t.device.index if t.device.index is not None else torch.cuda.current_device())
    side.wait_stream(current)
    with torch.cuda.stream(side):
        launch(t)
    try:
        yield
    finally:
        current.wait_stream(side)
