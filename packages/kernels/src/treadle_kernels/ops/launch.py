"""Launching a Triton kernel, or only compiling it: start-up compiles kernel variants in parallel.

A cold start used to compile every Triton variant one after another, the first time a start-up pass (profiling,
graph capture, warm-up) launched it: 26 variants, 10.9 s of an H200 host's 24.9 s to ready, 7.7 s of them the
attention kernels (benchmarks/results/gpu-compile-ahead-h200-529f98c). Inside ``compile_only(pool)`` a launch made
through ``launch`` does not run: the variant it would use is compiled on ``pool`` instead (Triton's ``warmup``,
from the arguments' dtypes and values alone), so a caller can walk the shapes it will run, cheaply on the host,
and have the compiles proceed side by side while it goes on. Launches that differ only in integer arguments
(batch sizes, strides) are mostly one variant: they share one job, run in turn, so a variant compiles once and
its repeats find it in Triton's cache. Until `compiles_finished()`, a real launch whose group is still on the
pool waits for that job instead of compiling the same variant again (Triton shares no in-flight compile
between threads); after a failed job, its variants compile at their first launch, as without it.

Outside ``compile_only`` (every step the engine serves), ``launch`` is ``kernel[grid](*args, **kwargs)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from typing import Any

import torch

Compile = tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]  # kernel, grid, stand-ins, kwargs
_PENDING: ContextVar[dict[tuple[Any, ...], list[Compile]] | None] = ContextVar(
    "treadle_compile_only", default=None
)
# the pool jobs of the compiles submitted so far, by group; None once the caller said they are all finished
_IN_FLIGHT: dict[tuple[Any, ...], Future[Any]] | None = None


@contextlib.contextmanager
def compile_only(pool: Executor) -> Iterator[list[Future[Any]]]:
    """Within, `launch` records compiles instead of running; on leaving, they go to `pool`, one job per group of
    launches that differ only in integer arguments. Yields the list that then holds those jobs' futures."""
    global _IN_FLIGHT
    futures: list[Future[Any]] = []
    groups: dict[tuple[Any, ...], list[Compile]] = {}
    token = _PENDING.set(groups)
    try:
        yield futures
    finally:
        _PENDING.reset(token)
        jobs = {key: pool.submit(_compile_all, group) for key, group in groups.items()}
        futures.extend(jobs.values())
        _IN_FLIGHT = {**(_IN_FLIGHT or {}), **jobs}


def compiles_finished() -> None:
    """The submitted compiles are done (the caller waited for them): launches stop looking for them."""
    global _IN_FLIGHT
    _IN_FLIGHT = None


def _compile_all(group: list[Compile]) -> None:
    for kernel, grid, stand_ins, kwargs in group:
        kernel.warmup(*stand_ins, grid=grid, **kwargs)


def _group(kernel: Any, stand_ins: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return (id(kernel), *(a for a in stand_ins if not isinstance(a, int)), *sorted(kwargs.items()))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside `compile_only`, record its compile instead. The compile sees
    each tensor as its dtype (Triton then assumes a 16-byte aligned pointer, as fresh allocations are), so no
    tensor is kept alive by a pending compile."""
    groups = _PENDING.get()
    if groups is None:
        if _IN_FLIGHT is not None:  # start-up only: wait for this variant's compile if the pool has it
            job = _IN_FLIGHT.get(_group(kernel, _stand_ins(args), kwargs))
            if job is not None:
                job.exception()  # waits; after a failure the launch below compiles the variant itself
        kernel[grid](*args, **kwargs)
        return
    stand_ins = _stand_ins(args)
    groups.setdefault(_group(kernel, stand_ins, kwargs), []).append((kernel, grid, stand_ins, kwargs))


def _stand_ins(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
