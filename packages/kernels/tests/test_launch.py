"""`launch` runs a kernel, or inside `compile_only` submits only its compile, with tensors as their dtypes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from treadle_kernels.ops.launch import compile_only, compiles_finished, launch


class FakeKernel:
    """Records launches (``kernel[grid](...)``) and compiles (``kernel.warmup(...)``) as Triton's JIT takes them."""

    def __init__(self) -> None:
        self.launched: list[tuple[Any, ...]] = []
        self.compiled: list[tuple[Any, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        return lambda *args, **kwargs: self.launched.append((grid, args, kwargs))

    def warmup(self, *args: Any, grid: tuple[int, ...], **kwargs: Any) -> str:
        self.compiled.append((grid, args, kwargs))
        return "compiled"


def test_launch_runs_outside_compile_only() -> None:
    kernel, x = FakeKernel(), torch.zeros(3, dtype=torch.bfloat16)
    launch(kernel, (3, 1), x, 7, BLOCK=16, num_warps=4)
    assert kernel.compiled == []
    assert len(kernel.launched) == 1
    grid, args, kwargs = kernel.launched[0]
    assert grid == (3, 1) and args[0] is x and args[1] == 7 and kwargs == {"BLOCK": 16, "num_warps": 4}


def test_compile_only_submits_the_compiles_and_launches_nothing() -> None:
    kernel, other, x = FakeKernel(), FakeKernel(), torch.zeros(3, dtype=torch.bfloat16)
    with ThreadPoolExecutor(2) as pool:
        with compile_only(pool) as futures:
            launch(kernel, (3,), x, 7, 2.5, BLOCK=16)
            launch(kernel, (5,), x.float(), 1, 0.0, BLOCK=32)
            launch(kernel, (9,), x, 9, 2.5, BLOCK=16)  # only integers differ: the first one's job
            launch(other, (3,), x, 7, 2.5, BLOCK=16)  # another kernel: its own job
            assert futures == []  # submitted on leaving the block
        assert len(futures) == 3
        for f in futures:
            f.result()
    assert kernel.launched == [] and other.launched == []
    # tensors reach the compile as their dtypes (Triton's warmup takes a dtype for a pointer): none is kept
    # alive; launches differing only in integers compile in turn, in launch order
    assert sorted(kernel.compiled, key=lambda c: c[0]) == [
        ((3,), (torch.bfloat16, 7, 2.5), {"BLOCK": 16}),
        ((5,), (torch.float32, 1, 0.0), {"BLOCK": 32}),
        ((9,), (torch.bfloat16, 9, 2.5), {"BLOCK": 16}),
    ]
    assert kernel.compiled.index(((3,), (torch.bfloat16, 7, 2.5), {"BLOCK": 16})) < kernel.compiled.index(
        ((9,), (torch.bfloat16, 9, 2.5), {"BLOCK": 16})
    )
    assert other.compiled == [((3,), (torch.bfloat16, 7, 2.5), {"BLOCK": 16})]
    compiles_finished()
    launch(kernel, (1,), x)  # after the block: launches again
    assert len(kernel.launched) == 1


class SlowKernel(FakeKernel):
    """Its compile takes a while; records when it finished and when each launch happened."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        return lambda *args, **kwargs: self.events.append(f"launch {args[1]}")

    def warmup(self, *args: Any, grid: tuple[int, ...], **kwargs: Any) -> str:
        time.sleep(0.3)
        self.events.append(f"compiled {args[1]}")
        return "compiled"


def test_a_launch_waits_for_its_variant_still_compiling_until_compiles_finished() -> None:
    kernel, x = SlowKernel(), torch.zeros(3, dtype=torch.bfloat16)
    try:
        with ThreadPoolExecutor(1) as pool:
            with compile_only(pool) as futures:
                launch(kernel, (3,), x, 7, BLOCK=16)
            launch(
                kernel, (3,), x, 9, BLOCK=16
            )  # the same group (only an integer differs): waits for its job
            launch(kernel, (3,), x, 9, BLOCK=32)  # another group, never submitted: runs at once
            assert kernel.events == ["compiled 7", "launch 9", "launch 9"]
            futures[0].result()
        compiles_finished()
        with ThreadPoolExecutor(1) as pool:
            with compile_only(pool):
                launch(kernel, (3,), x, 5, BLOCK=64)
            compiles_finished()  # the caller says they are done: launches no longer look for them
            launch(kernel, (3,), x, 6, BLOCK=64)
            assert kernel.events[-1] == "launch 6" and "compiled 5" not in kernel.events
    finally:
        compiles_finished()
