"""MXFP4 experts of a FusedMoE layer (gpt-oss): their storage, loading a checkpoint's blocks, quantizing loaded weights.

A FusedMoE holding MXFP4 experts (experts/mxfp4.py) has `w13_weight` uint8 [E, 2N, K / 32, 16] (gate rows, then up
rows) and `w2_weight` uint8 [E, K, N / 32, 16] beside their e8m0 scales `w13_weight_scale` uint8 [E, 2N, K / 32] and
`w2_weight_scale` uint8 [E, K, N / 32]; its biases (gpt-oss) stay in the model dtype, and `mxfp4_layout` is set, so
the forward hands the scales to the kernel (`mxfp4_scales`). N is the layer's own (a tensor-parallel rank's) width,
which must be a multiple of 32 (a scale block never straddles two ranks); E its own experts (expert parallelism:
whole experts, ids global, treadle_moe/placement.py).
- `allocate_mxfp4`: empty storage for a checkpoint's experts (the layer may have been built on the meta device);
- `load_mxfp4_projection`: a stacked projection of every expert ([E_all, rows, groups, 16] blocks with their scales,
  the w13 rows already gate-then-up), or of one expert, of which the layer keeps its experts and, under tensor
  parallelism, its columns from `first_column`: its gate rows and up rows of w13, its blocks of w2's inputs;
- `quantize_to_mxfp4`: loaded model-dtype experts replaced by their round-to-nearest MXFP4 form (dummy weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from treadle_moe.expert_bias import allocate_biases
from treadle_moe.experts.mxfp4 import MXFP4_BLOCK, Mxfp4ExpertScales, Mxfp4Layout, quantize_experts_mxfp4

if TYPE_CHECKING:
    from treadle_moe.layer import FusedMoE

__all__ = ["allocate_mxfp4", "expert_bytes", "load_mxfp4_projection", "mxfp4_scales", "quantize_to_mxfp4"]

_HALF = MXFP4_BLOCK // 2  # bytes per block


def _set(moe: FusedMoE, name: str, t: torch.Tensor) -> None:
    param = nn.Parameter(t, requires_grad=False)
    param.weight_loader = moe.weight_loader  # type: ignore[attr-defined]
    setattr(moe, name, param)


def _check_widths(moe: FusedMoE) -> None:
    k, n = moe.hidden_size, moe.intermediate_size
    if k % MXFP4_BLOCK or n % MXFP4_BLOCK:
        raise ValueError(
            f"MXFP4 experts scale blocks of {MXFP4_BLOCK} inputs: the hidden size ({k}) and this rank's expert width "
            f"({n}) must be multiples of {MXFP4_BLOCK}; under tensor parallelism pick a tensor_parallel_size that "
            f"cuts the expert width in multiples of {MXFP4_BLOCK}, or use expert parallelism (whole experts per "
            "rank), or dequantize the experts (TREADLE_MXFP4_DEQUANTIZE=1)"
        )


def allocate_mxfp4(moe: FusedMoE, device: torch.device | str | None = None) -> None:
    """Storage for MXFP4 experts (module docstring); model-dtype biases get storage too, zero until loaded."""
    if moe.fp8_layout is not None or moe.int4_layout is not None:
        raise ValueError(f"MoE layer ({moe.extra_repr()}) already holds fp8 or 4-bit experts")
    _check_widths(moe)
    e, k, n = moe.placement.num_local, moe.hidden_size, moe.intermediate_size
    u8 = torch.uint8
    _set(moe, "w13_weight", torch.empty(e, 2 * n, k // MXFP4_BLOCK, _HALF, dtype=u8, device=device))
    _set(moe, "w2_weight", torch.empty(e, k, n // MXFP4_BLOCK, _HALF, dtype=u8, device=device))
    _set(moe, "w13_weight_scale", torch.empty(e, 2 * n, k // MXFP4_BLOCK, dtype=u8, device=device))
    _set(moe, "w2_weight_scale", torch.empty(e, k, n // MXFP4_BLOCK, dtype=u8, device=device))
    if moe.w13_bias is not None:
        allocate_biases(moe, moe.w13_bias.dtype, device)
    moe.mxfp4_layout = Mxfp4Layout()


@torch.no_grad()
def load_mxfp4_projection(
    moe: FusedMoE,
    proj: str,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    first_column: int = 0,
    name: str = "the checkpoint's tensor",
    expert: int | None = None,
) -> None:
    """Copy `proj` ("w13" or "w2") of every expert, blocks [E_all, rows, groups, 16] and scales [E_all, rows, groups]
    (w13: 2 * the full width of gate rows then up rows, K / 32 groups; w2: K rows, full width / 32 groups), or of the
    one global `expert` (blocks [rows, groups, 16]; another rank's is ignored), into this layer's experts and
    columns [first_column, +N) (tensor parallelism; 0 for one rank)."""
    assert moe.mxfp4_layout is not None, "allocate_mxfp4 first"
    assert proj in ("w13", "w2"), f"MXFP4 projection {proj!r} is w13 or w2"
    e_all, n, k = moe.num_experts, moe.intermediate_size, moe.hidden_size
    if first_column % MXFP4_BLOCK:
        raise ValueError(f"this rank's first expert column {first_column} is not a multiple of {MXFP4_BLOCK}")
    full_n = (blocks.shape[-3] // 2) if proj == "w13" else blocks.shape[-2] * MXFP4_BLOCK
    rows_groups = (2 * full_n, k // MXFP4_BLOCK) if proj == "w13" else (k, full_n // MXFP4_BLOCK)
    expected: tuple[int, ...] = rows_groups if expert is not None else (e_all, *rows_groups)
    if (
        blocks.dtype != torch.uint8
        or scales.dtype != torch.uint8
        or tuple(blocks.shape) != (*expected, _HALF)
        or tuple(scales.shape) != expected
        or first_column + n > full_n
    ):
        raise ValueError(
            f"{name}: MXFP4 {proj} blocks {blocks.dtype} {tuple(blocks.shape)} / scales {scales.dtype} "
            f"{tuple(scales.shape)} do not fit the layer: it expects uint8 {(*expected, _HALF)} / {expected} "
            f"covering columns {first_column}..{first_column + n} (num_experts {e_all}, hidden size {k}); check "
            "config.json against the checkpoint"
        )
    weight = moe.w13_weight if proj == "w13" else moe.w2_weight
    scale = moe.w13_weight_scale if proj == "w13" else moe.w2_weight_scale
    assert scale is not None, "allocate_mxfp4 gives the scales storage"
    if expert is None:
        first, count = moe.placement.first, moe.placement.num_local
        blocks, scales = blocks.narrow(0, first, count), scales.narrow(0, first, count)
        target, target_scale = weight.data, scale.data
    else:
        local = moe.placement.local_id(expert)
        if local is None:
            return
        target, target_scale = weight.data[local], scale.data[local]
    if proj == "w13":
        gate = torch.arange(first_column, first_column + n, device=blocks.device)
        rows = torch.cat([gate, gate + full_n])  # this rank's gate rows, then its up rows
        blocks, scales = blocks.index_select(-3, rows), scales.index_select(-2, rows.to(scales.device))
    else:
        g0, groups = first_column // MXFP4_BLOCK, n // MXFP4_BLOCK
        blocks, scales = blocks.narrow(-2, g0, groups), scales.narrow(-1, g0, groups)
    target.copy_(blocks)
    target_scale.copy_(scales)


@torch.no_grad()
def quantize_to_mxfp4(moe: FusedMoE) -> None:
    """Replace loaded model-dtype experts by their MXFP4 form (round to nearest; experts/mxfp4.py)."""
    if moe.fp8_layout is not None or moe.int4_layout is not None or moe.mxfp4_layout is not None:
        raise ValueError(f"MoE layer ({moe.extra_repr()}) holds quantized experts already")
    _check_widths(moe)
    b13, b2, scales = quantize_experts_mxfp4(moe.w13_weight, moe.w2_weight)
    _set(moe, "w13_weight", b13)
    _set(moe, "w2_weight", b2)
    _set(moe, "w13_weight_scale", scales.w13_scale)
    _set(moe, "w2_weight_scale", scales.w2_scale)
    moe.mxfp4_layout = Mxfp4Layout()


def mxfp4_scales(moe: FusedMoE) -> Mxfp4ExpertScales | None:
    """The MXFP4 experts' scales for the kernel; None unless the layer holds MXFP4 experts."""
    if moe.mxfp4_layout is None:
        return None
    assert moe.w13_weight_scale is not None and moe.w2_weight_scale is not None, "MXFP4 experts have scales"
    return Mxfp4ExpertScales(moe.w13_weight_scale, moe.w2_weight_scale, moe.mxfp4_layout)


def expert_bytes(moe: FusedMoE) -> int:
    """Bytes the layer's expert matrices take (with their scales), whatever their format."""
    held = [moe.w13_weight, moe.w2_weight, moe.w13_weight_scale, moe.w2_weight_scale]
    return sum(t.numel() * t.element_size() for t in held if t is not None)
