"""fp8 experts: the two scale layouts of float8_e4m3fn expert weights, and the per-expert spec they compute.

The expert weights w13 [E, 2N, K] (gate rows, then up rows) and w2 [E, K, N] are float8_e4m3fn with fp32 scales
(`Fp8ExpertScales`), in one of two layouts (`Fp8Layout`):
- per channel (`block` None; what `quantization="fp8"` gives online): one scale per output row of each expert,
  w13 scale [E, 2N], w2 scale [E, K] (a checkpoint's per-tensor scales are broadcast to their rows: exact, and the
  gate and up matrices keep their own scales); each GEMM's activations are quantized per row (token), dynamically:
  the numerics of `treadle_ir.ops.fp8_linear` (input_scale None). With `static_activations` (checkpoints calibrated
  with per-tensor input scales, Mixtral-8x7B-Instruct-FP8 style) every row of the w13 input is quantized with one
  scale `Fp8ExpertScales.w13_input` [1] and every row of the w2 input with `w2_input` [1] (values beyond
  448 * scale saturate): fp8_linear with that input_scale. One scale per GEMM, not per expert, as the w13 input is
  quantized once for all the experts a token goes to (a checkpoint's per-expert scales are folded to their
  maximum by the layer);
- block-wise (`block` = (block_n, block_k); Qwen3-FP8 / DeepSeek-V3 checkpoints): one scale per [block_n, block_k]
  tile of each expert's gate, up and down matrix. The gate and up grids are stacked along N, gate block rows first:
  w13 scale [E, 2 * ceil(N / block_n), ceil(K / block_k)] (so N need not be a multiple of block_n); w2 scale
  [E, ceil(K / block_n), ceil(N / block_k)]. Activations are quantized per (row, group of block_k features),
  dynamically: the numerics of `treadle_ir.ops.fp8_block_linear`.

The spec (`expert_mlp_fp8`, what the torch reference experts run and every other implementation matches): an
expert applied to its tokens x [T, K] is the dense IR ops' reference implementations, as if the checkpoint's
gate_proj, up_proj and down_proj were dense fp8 projections:
    gate, up = fp8 linear(x, gate), fp8 linear(x, up)           # x quantized per token (group); out in x's dtype
    y = fp8 linear(act(gate) * up, down)                        # the activation output quantized the same way
so the input of the w13 GEMM is quantized once per token whatever expert it goes to, and the input of w2 is the
activation output rounded to x's dtype, then quantized per row (slot), per group in the block layout. Each op runs
its reference (`.native`) implementation, the activation its native formula (activation.py), so the spec depends on
no kernel.

`quantize_experts` makes either layout from model-dtype weights (online quantization, dummy weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from treadle_ir import ops
from treadle_ir.ops.fp8 import FP8_DTYPE, quantize_with_scale, row_scale
from treadle_ir.ops.fp8_block import num_blocks, quantize_fp8_blocks
from treadle_moe.activation import act_and_mul_native

logger = logging.getLogger(__name__)

__all__ = [
    "Fp8ExpertScales",
    "Fp8Layout",
    "check_fp8_scales",
    "expert_mlp_fp8",
    "fold_input_scales",
    "quantize_experts",
]


@dataclass(frozen=True, slots=True)
class Fp8Layout:
    """How fp8 expert weights are scaled (and so how activations are quantized)."""

    # (block_n, block_k): one scale per weight tile; None: one per output row
    block: tuple[int, int] | None = None
    # per channel only: activations quantized with the given per-tensor scales (Fp8ExpertScales.w13_input / w2_input)
    static_activations: bool = False

    def __post_init__(self) -> None:
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise ValueError(
                f"fp8 weight block {self.block} must be (block_n, block_k), two positive integers"
            )
        if self.block is not None and self.static_activations:
            raise ValueError(
                "block-wise fp8 experts quantize activations dynamically per token group, not static"
            )

    def describe(self) -> str:
        if self.block is None:
            activations = "static per-tensor" if self.static_activations else "dynamic per-token"
            return f"fp8 w8a8 per-channel (weight scale per output row, {activations} activations)"
        block_n, block_k = self.block
        return f"fp8 w8a8 block-wise ({block_n}x{block_k} weight scales, dynamic per-(token, {block_k}) activations)"

    def w13_scale_shape(self, num_experts: int, n: int, k: int) -> tuple[int, ...]:
        if self.block is None:
            return (num_experts, 2 * n)
        block_n, block_k = self.block
        return (num_experts, 2 * num_blocks(n, block_n), num_blocks(k, block_k))

    def w2_scale_shape(self, num_experts: int, n: int, k: int) -> tuple[int, ...]:
        if self.block is None:
            return (num_experts, k)
        block_n, block_k = self.block
        return (num_experts, num_blocks(k, block_n), num_blocks(n, block_k))


@dataclass(frozen=True, slots=True)
class Fp8ExpertScales:
    """The fp32 scales of float8_e4m3fn w13 / w2 (shapes: `Fp8Layout`)."""

    w13: torch.Tensor  # per channel [E, 2N]; block [E, 2 * ceil(N / block_n), ceil(K / block_k)]
    w2: torch.Tensor  # per channel [E, K]; block [E, ceil(K / block_n), ceil(N / block_k)]
    layout: Fp8Layout
    # static activations only: the input scales [1] of the w13 and of the w2 GEMM (every expert's)
    w13_input: torch.Tensor | None = None
    w2_input: torch.Tensor | None = None


def check_fp8_scales(w13: torch.Tensor, w2: torch.Tensor, scales: Fp8ExpertScales | None) -> None:
    """ValueError unless the weights are fp8 exactly when scales are given, with scales of the layout's shapes."""
    is_fp8 = w13.dtype == FP8_DTYPE and w2.dtype == FP8_DTYPE
    if scales is None:
        if w13.dtype == FP8_DTYPE or w2.dtype == FP8_DTYPE:
            raise ValueError("float8_e4m3fn expert weights need their scales (Fp8ExpertScales)")
        return
    if not is_fp8:
        raise ValueError(
            f"fp8 scales were given but the expert weights are {w13.dtype} / {w2.dtype}; "
            "quantize both to float8_e4m3fn"
        )
    num_experts, two_n, k = w13.shape
    n = two_n // 2
    for name, t, shape in (
        ("w13", scales.w13, scales.layout.w13_scale_shape(num_experts, n, k)),
        ("w2", scales.w2, scales.layout.w2_scale_shape(num_experts, n, k)),
    ):
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(
                f"{name} scale is {t.dtype} {tuple(t.shape)}; {scales.layout.describe()} needs float32 {shape}"
            )
    for name, given in (("w13_input", scales.w13_input), ("w2_input", scales.w2_input)):
        if not scales.layout.static_activations:
            if given is not None:
                raise ValueError(f"{name} scale given, but {scales.layout.describe()} quantizes dynamically")
        elif given is None or tuple(given.shape) != (1,) or given.dtype != torch.float32:
            raise ValueError(f"{scales.layout.describe()} needs a float32 [1] {name} scale, got {given!r}")


def fold_input_scales(w13_inputs: torch.Tensor, w2_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's static input scales, one per expert matrix (w13 [E, 2]: gate's and up's; w2 [E]) -> the one
    scale [1] fp32 of each GEMM every expert's input is quantized with: their maximum (no input that any expert's
    calibration covered saturates), logged as a warning when they differ (a checkpoint calibrated per expert)."""
    w13, w2 = w13_inputs.float().amax().reshape(1), w2_inputs.float().amax().reshape(1)
    if bool((w13_inputs != w13).any() | (w2_inputs != w2).any()):
        logger.warning(
            "fp8 experts: the static input scales of the experts differ (a scale per expert); every expert "
            "quantizes its input with their maximum (w13 %.4g, w2 %.4g)", w13.item(), w2.item(),
        )  # fmt: skip
    return w13, w2


def expert_mlp_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    layout: Fp8Layout,
    activation: str,
    w13_input: torch.Tensor | None = None,
    w2_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fp8 expert, the spec (module docstring): x [T, K], w13 [2N, K] / w2 [K, N] fp8 with this expert's scales
    (and the static input scales [1]) -> [T, K] in x's dtype."""
    if layout.block is None:
        h = ops.fp8_linear.native(x, w13, w13_scale, None, w13_input)  # [T, 2N]
        return ops.fp8_linear.native(act_and_mul_native(h, activation), w2, w2_scale, None, w2_input)
    block_n, block_k = layout.block
    n = w2.shape[1]
    gate_rows = num_blocks(n, block_n)
    gate = ops.fp8_block_linear.native(x, w13[:n], w13_scale[:gate_rows], None, block_n, block_k)
    up = ops.fp8_block_linear.native(x, w13[n:], w13_scale[gate_rows:], None, block_n, block_k)
    h = act_and_mul_native(torch.cat([gate, up], dim=-1), activation)  # [T, N]
    return ops.fp8_block_linear.native(h, w2, w2_scale, None, block_n, block_k)


@torch.no_grad()
def quantize_experts(
    w13: torch.Tensor,
    w2: torch.Tensor,
    layout: Fp8Layout,
    w2_row_amax: Callable[[torch.Tensor], torch.Tensor] = lambda amax: amax,
) -> tuple[torch.Tensor, torch.Tensor, Fp8ExpertScales]:
    """Model-dtype w13 [E, 2N, K] / w2 [E, K, N] -> (fp8 w13, fp8 w2, their scales) in `layout`: per channel each
    row's amax / 448; block-wise each tile's (gate, up and down matrix apart). `w2_row_amax` turns this rank's
    [E, K] row maxima into the whole rows' (tensor parallelism cuts w2's rows)."""
    if layout.static_activations:
        raise ValueError(
            "static activation scales come from a calibrated checkpoint; quantize dynamically here"
        )
    if layout.block is None:
        s13 = row_scale(w13.abs().amax(dim=2).float())  # [E, 2N]
        s2 = row_scale(w2_row_amax(w2.abs().amax(dim=2).float()))  # [E, K]
        q13 = quantize_with_scale(w13, s13[..., None])
        q2 = quantize_with_scale(w2, s2[..., None])
        return q13, q2, Fp8ExpertScales(s13, s2, layout)
    block_n, block_k = layout.block
    n = w2.shape[2]
    q13, q2 = torch.empty_like(w13, dtype=FP8_DTYPE), torch.empty_like(w2, dtype=FP8_DTYPE)
    s13 = torch.empty(layout.w13_scale_shape(w13.shape[0], n, w13.shape[2]), device=w13.device)
    s2 = torch.empty(layout.w2_scale_shape(w13.shape[0], n, w13.shape[2]), device=w13.device)
    gate_rows = num_blocks(n, block_n)
    for e in range(w13.shape[0]):
        for rows, grid_rows in (
            (slice(0, n), slice(0, gate_rows)),
            (slice(n, 2 * n), slice(gate_rows, None)),
        ):
            q13[e, rows], s13[e, grid_rows] = quantize_fp8_blocks(w13[e, rows], block_n, block_k)
        q2[e], s2[e] = quantize_fp8_blocks(w2[e], block_n, block_k)
    return q13, q2, Fp8ExpertScales(s13, s2, layout)
