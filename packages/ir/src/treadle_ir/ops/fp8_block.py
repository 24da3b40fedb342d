"""Block-wise fp8 (DeepSeek-V3 / Qwen3-FP8 checkpoints): ``quantize_fp8_groups`` and ``fp8_block_linear``.

A block-quantized weight [n, k] is float8_e4m3fn with one fp32 scale per [block_n, block_k] tile: weight_scale
[ceil(n / block_n), ceil(k / block_k)], the last row and column of tiles ragged when block_n or block_k does not
divide n or k. Its dequantized value is ``weight[i, j] * weight_scale[i // block_n, j // block_k]`` (checkpoints
call the scale ``weight_scale_inv``, but it multiplies). The activations are quantized dynamically per token in
groups of ``block_k`` consecutive features (the last one ragged), so each (token, K block) pair has one scale and
the matmul can apply both scales to each K block's partial sum.

Quantization of a group is that of a row in treadle_ir.ops.fp8 (``quantize_fp8_rows``): scale ``amax / 448`` (1 for
an all-zero group), values ``x * (1 / scale)`` (the reciprocal rounded to fp32 first) clamped to [-448, 448] and
rounded to nearest-even e4m3.

Numerics of ``fp8_block_linear`` (what every provider matches, up to the fp32 summation order):
``dequant(q_x, s_x) @ dequant(weight, weight_scale)^T + bias`` in fp32, rounded once to x's dtype. A provider may
sum each K block's exact e4m3 products first and scale that partial sum (what a block-scaled GEMM does); both are
the same real number, rounded differently in fp32. As with ``fp8_linear``, a provider may not skip the
activation quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..op import op
from .fp8 import FP8_DTYPE, quantize_with_scale, row_scale

__all__ = [
    "dequantize_blocks",
    "fp8_block_linear",
    "num_blocks",
    "quantize_fp8_blocks",
    "quantize_fp8_groups",
]


def num_blocks(size: int, block: int) -> int:
    """Blocks of `block` covering `size` (the last one ragged)."""
    return -(-size // block)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., k] as fp32 [..., ceil(k / group_size), group_size], the last group padded with zeros."""
    k = x.shape[-1]
    groups = num_blocks(k, group_size)
    padded = F.pad(x.float(), (0, groups * group_size - k))
    return padded.view(*x.shape[:-1], groups, group_size)


def dequantize_blocks(
    weight: torch.Tensor, weight_scale: torch.Tensor, block_n: int, block_k: int
) -> torch.Tensor:
    """fp32 [n, k]: each value of the fp8 `weight` times its tile's scale."""
    n, k = weight.shape
    scale = (
        weight_scale.float().repeat_interleave(block_n, dim=0)[:n].repeat_interleave(block_k, dim=1)[:, :k]
    )
    return weight.float() * scale


def quantize_fp8_blocks(
    weight: torch.Tensor, block_n: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [n, k] -> (float8_e4m3fn [n, k], fp32 scales [ceil(n / block_n), ceil(k / block_k)]): each tile
    quantized with its own amax / 448 (what block-quantized checkpoints hold; dummy weights use it)."""
    n, k = weight.shape
    rows, cols = num_blocks(n, block_n), num_blocks(k, block_k)
    padded = F.pad(weight.float(), (0, cols * block_k - k, 0, rows * block_n - n))
    tiles = padded.view(rows, block_n, cols, block_k)
    scale = row_scale(tiles.abs().amax(dim=(1, 3)))  # [rows, cols]
    q = quantize_with_scale(tiles, scale[:, None, :, None]).view(rows * block_n, cols * block_k)
    return q[:n, :k].contiguous(), scale


def _example_groups(device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    return torch.randn(8, 4096, device=device, dtype=dtype), 128  # [num_tokens, hidden], group size


def _example_linear(device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    x = torch.randn(1, 4096, device=device, dtype=dtype)  # one decode token
    weight = torch.empty(4096, 4096, device=device, dtype=FP8_DTYPE)  # the report needs shapes only
    return x, weight, torch.ones(32, 32, device=device), None, 128, 128


@op(example=_example_groups)
def quantize_fp8_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., k] -> (q [..., k] float8_e4m3fn, scale [..., ceil(k / group_size)] fp32) with x ~= q * scale of its
    group: each row cut into groups of `group_size` consecutive values (the last one ragged), one scale each."""
    k = x.shape[-1]
    grouped = _grouped(x, group_size)
    scale = row_scale(grouped.abs().amax(dim=-1))
    q = quantize_with_scale(grouped, scale[..., None]).flatten(-2)
    return q[..., :k].contiguous(), scale


@op(example=_example_linear)
def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    """``dequant(x) @ dequant(weight)^T + bias``: x [..., k] (float) quantized per token in groups of `block_k`;
    weight [n, k] float8_e4m3fn; weight_scale [ceil(n / block_n), ceil(k / block_k)] fp32 (one per tile);
    bias [n] or None. Result [..., n] in x's dtype."""
    q, scale = quantize_fp8_groups.native(x, block_k)
    x_deq = (_grouped(q, block_k) * scale[..., None]).flatten(-2)[..., : x.shape[-1]]
    y = torch.matmul(x_deq, dequantize_blocks(weight, weight_scale, block_n, block_k).t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
