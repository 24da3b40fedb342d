"""Test helper (no tests here): the `torch` attention backend with XQA's fp8 roundings, as a yardstick for XQA.

XQA's fp8 kernel (treadle_kernels/attention/xqa.py) multiplies in e4m3: the query is rounded to e4m3 for Q·Kᵀ, and
the softmax weights exp(s - max) to e4m3 for P·V, then divided by their fp32 sum. `rounded_like_xqa(steps)` makes
the torch backend's attention do the same on the runner steps it names (0-based, counted by `runner.execute`), so a
test can measure how far that rounding alone moves a model's hidden states, and bound XQA by it instead of by a
number measured on another model (a peaked model moves several times more than a flat one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import treadle_kernels.attention.torch_backend as torch_backend

E4M3 = torch.float8_e4m3fn


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
    if k.shape[-3] != q.shape[-3]:  # grouped query heads: each kv head serves q's heads in a row
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float().to(E4M3).float(), k.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (torch.matmul(p.to(E4M3).float(), v.float()) / p.sum(-1, keepdim=True)).to(q.dtype)


class _Functional:
    """torch.nn.functional, except scaled_dot_product_attention while `on`."""

    def __init__(self) -> None:
        self.on = False

    def __getattr__(self, name: str) -> Any:
        if name == "scaled_dot_product_attention" and self.on:
            return _attention
        return getattr(F, name)


@contextlib.contextmanager
def rounded_like_xqa(runner: Any, steps: set[int]) -> Iterator[None]:
    """Within the block, the torch backend of `runner` attends with XQA's e4m3 roundings on the named steps."""
    functional = _Functional()
    execute, count = runner.execute, [0]

    def counted(scheduler_output: Any) -> Any:
        functional.on = count[0] in steps
        count[0] += 1
        return execute(scheduler_output)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_backend, "F", functional)
        patch.setattr(runner, "execute", counted)
        yield
