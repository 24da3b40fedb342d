"""fp8 experts of a FusedMoE layer (layer.py's docstring has the layout): quantizing its loaded model-dtype weights,
storage for an fp8 checkpoint's, and the scales its forward hands the kernel.

- `quantize_fp8`: loaded model-dtype experts replaced by float8_e4m3fn in a layout (experts/fp8.py), the originals
  freed (online `quantization="fp8"`; block-wise dummy weights);
- `allocate_fp8`: empty fp8 weights and fp32 scales (and, with static activations, every expert's input scales) for
  `weight_loader` to fill (the layer may have been built on the meta device);
- `fp8_scales`: the scales for the kernel, a static layout's input scales folded to one per GEMM (`fold_input_scales`,
  done again after the layer moves or an input scale is loaded again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from treadle_moe.expert_bias import check_unquantized
from treadle_moe.experts.fp8 import Fp8ExpertScales, Fp8Layout, fold_input_scales, quantize_experts

if TYPE_CHECKING:
    from treadle_moe.layer import FusedMoE

__all__ = ["allocate_fp8", "fp8_scales", "quantize_fp8"]


def fp8_scales(moe: FusedMoE) -> Fp8ExpertScales | None:
    """The fp8 experts' scales for the kernel; None for model-dtype weights."""
    if moe.fp8_layout is None:
        return None
    assert moe.w13_weight_scale is not None and moe.w2_weight_scale is not None, "fp8 experts have scales"
    if not moe.fp8_layout.static_activations:
        return Fp8ExpertScales(moe.w13_weight_scale, moe.w2_weight_scale, moe.fp8_layout)
    assert moe.w13_input_scale is not None and moe.w2_input_scale is not None
    folded = moe._folded_input_scales
    # not folded yet, or the module moved since
    if folded is None or folded[0].device != moe.w13_input_scale.device:
        folded = moe._folded_input_scales = fold_input_scales(moe.w13_input_scale, moe.w2_input_scale)
    w13_input, w2_input = folded
    return Fp8ExpertScales(moe.w13_weight_scale, moe.w2_weight_scale, moe.fp8_layout, w13_input, w2_input)


@torch.no_grad()
def quantize_fp8(moe: FusedMoE, layout: Fp8Layout) -> None:
    """Replace the loaded model-dtype experts by float8_e4m3fn in `layout` (experts/fp8.py); the originals are
    freed."""
    check_unquantized(moe, "fp8")
    q13, q2, scales = quantize_experts(moe.w13_weight, moe.w2_weight, layout, moe.w2_row_amax)
    moe.w13_weight = moe._parameter(q13)
    moe.w2_weight = moe._parameter(q2)
    moe.w13_weight_scale = moe._parameter(scales.w13)
    moe.w2_weight_scale = moe._parameter(scales.w2)
    moe.fp8_layout = layout


def allocate_fp8(moe: FusedMoE, layout: Fp8Layout, device: torch.device | str | None = None) -> None:
    """Storage for an fp8 checkpoint's experts (the layer may have been built on the meta device): fp8 weights
    and fp32 scales in `layout`, all to be filled by `weight_loader`."""
    check_unquantized(moe, "fp8")
    e, k, n = moe.placement.num_local, moe.hidden_size, moe.intermediate_size
    fp8 = torch.float8_e4m3fn
    moe.w13_weight = moe._parameter(torch.empty(e, 2 * n, k, dtype=fp8, device=device))
    moe.w2_weight = moe._parameter(torch.empty(e, k, n, dtype=fp8, device=device))
    moe.w13_weight_scale = moe._parameter(torch.empty(layout.w13_scale_shape(e, n, k), device=device))
    moe.w2_weight_scale = moe._parameter(torch.empty(layout.w2_scale_shape(e, n, k), device=device))
    if layout.static_activations:  # every expert's (the fold is their maximum, the same on every rank)
        moe.w13_input_scale = moe._parameter(torch.ones(moe.num_experts, 2, device=device))
        moe.w2_input_scale = moe._parameter(torch.ones(moe.num_experts, device=device))
        moe._folded_input_scales = None
    moe.fp8_layout = layout
