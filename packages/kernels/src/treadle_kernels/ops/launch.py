"""Launching a Triton kernel, or only compiling it: start-up compiles kernel variants in parallel.

A cold start used to compile every Triton variant one after another, the first time a start-up pass (profiling,
graph capture, warm-up) launched it: 26 variants, 10.9 s of an H200 host's 24.9 s to ready, 7.7 s of them the
attention kernels (results/gpu-coldstart-compile-h200-529f98c). Inside ``compile_only(pool)`` a launch made
through ``launch`` does not run: the variant it would use is compiled on ``pool`` instead (Triton's ``warmup``,
from the arguments' dtypes and values alone), so a caller can walk the shapes it will run, cheaply on the host,
and have the compiles proceed side by side while it goes on. A later real launch of a variant compiled by then
finds it in Triton's cache; one still compiling is compiled again by the launching thread (Triton shares no
in-flight compile between threads), which costs time but never changes a result.

Outside ``compile_only`` (every step the engine serves), ``launch`` is ``kernel[grid](*args, **kwargs)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from typing import Any

import torch

_PENDING: ContextVar[tuple[Executor, list[Future[Any]]] | None] = ContextVar(
    "treadle_compile_only", default=None
)


@contextlib.contextmanager
def compile_only(pool: Executor) -> Iterator[list[Future[Any]]]:
    """Within, `launch` compiles on `pool` instead of running; yields the list of those compiles' futures."""
    futures: list[Future[Any]] = []
    token = _PENDING.set((pool, futures))
    try:
        yield futures
    finally:
        _PENDING.reset(token)


def compiling_only() -> bool:
    """Whether launches in this context only compile (a caller's host-side work may then be skipped)."""
    return _PENDING.get() is not None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside `compile_only`, submit its compile instead. The compile sees
    each tensor as its dtype (Triton then assumes a 16-byte aligned pointer, as fresh allocations are), so no
    tensor is kept alive by a pending compile."""
    pending = _PENDING.get()
    if pending is None:
        kernel[grid](*args, **kwargs)
        return
    pool, futures = pending
    stand_ins = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
    futures.append(pool.submit(kernel.warmup, *stand_ins, grid=grid, **kwargs))
