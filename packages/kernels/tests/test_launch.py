"""`launch` runs a kernel, or inside `compile_only` submits only its compile, with tensors as their dtypes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from treadle_kernels.ops.launch import compile_only, launch


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
    launch(kernel, (1,), x)  # after the block: launches again
    assert len(kernel.launched) == 1
