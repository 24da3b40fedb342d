"""4-bit weight-only (W4A16) experts: treadle's 4-bit layout stacked per expert, and the per-expert spec.

Each expert projection is held in the one packed layout of `treadle_ir.ops.int4` (GPTQ's row packing, output columns
last), stacked along a leading expert dimension:
- w13 int32 [E, K / 8, 2N]: expert e's gate columns 0..N-1, then its up columns N..2N-1 (the gate and up projections
  read the same input, so they stack as output columns of one projection);
- w2 int32 [E, N / 8, K]: the down projection (N inputs, K outputs);
- scales [E, groups, columns] (the model dtype), zero points uint8 [E, groups, columns] or None (symmetric: 8);
- g_idx int32 [E, K] (w13) / [E, N] (w2) or None: each input row's group (act order). The gate and up projections
  of an expert read the same input, so they share one activation order (GPTQ orders a projection's input rows by
  its input's statistics); a checkpoint whose gate and up g_idx differ is refused at load.
`Int4Layout.group_size` is the input rows per group; -1 is one group per output column (per channel), i.e. K rows
for w13 and N rows for w2 (`group_size_of`). Under tensor parallelism an act-order w2 keeps every group's scales
(its rows' g_idx may name any), so the group count is read from the scales, not derived from N.

The spec (`expert_mlp_int4`, what the torch reference runs and every kernel matches): an expert applied to its tokens
x [T, K] is the dense IR op's reference on its two projections:
    h = w4a16_linear(x, w13[e])                 # [T, 2N] in x's dtype (fp32 sum, rounded once)
    y = w4a16_linear(act(gate) * up, w2[e])     # the activation in fp32, rounded to x's dtype
`quantize_experts_int4` makes the layout from model-dtype weights by round to nearest (dummy weights, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treadle_ir import ops
from treadle_ir.ops.int4 import INT4_PACK, SYMMETRIC_ZERO, pack_int4_rows
from treadle_moe.activation import act_and_mul_native

__all__ = [
    "Int4ExpertScales",
    "Int4Layout",
    "check_int4_experts",
    "expert_mlp_int4",
    "int4_expert_sizes",
    "quantize_experts_int4",
]


@dataclass(frozen=True, slots=True)
class Int4Layout:
    """How 4-bit expert weights are grouped."""

    group_size: int  # input rows per group; -1: one group per output column
    has_zeros: bool  # zero points stored (asymmetric); else every zero point is 8
    act_order: bool  # g_idx per input row

    def __post_init__(self) -> None:
        if self.group_size < 1 and self.group_size != -1:
            raise ValueError(f"4-bit group_size {self.group_size} must be positive, or -1 (per channel)")

    def group_size_of(self, k: int) -> int:
        """Input rows per group of a projection with k inputs."""
        return k if self.group_size == -1 else self.group_size

    def describe(self) -> str:
        groups = "per-channel" if self.group_size == -1 else f"group size {self.group_size}"
        zeros = "zero points" if self.has_zeros else "symmetric"
        order = ", act order" if self.act_order else ""
        return f"w4a16 ({groups}, {zeros}{order}; 16-bit activations)"


@dataclass(frozen=True, slots=True)
class Int4ExpertScales:
    """The tensors beside packed int32 w13 [E, K / 8, 2N] / w2 [E, N / 8, K] (module docstring)."""

    w13_scale: torch.Tensor  # [E, groups, 2N]
    w2_scale: torch.Tensor  # [E, groups, K]
    w13_zero: torch.Tensor | None  # uint8 [E, groups, 2N]
    w2_zero: torch.Tensor | None  # uint8 [E, groups, K]
    w13_g_idx: torch.Tensor | None  # int32 [E, K]
    w2_g_idx: torch.Tensor | None  # int32 [E, N]
    layout: Int4Layout

    def expert(self, e: int, which: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(scales, zeros, g_idx) of expert e's "w13" or "w2" projection."""
        scale, zero, g_idx = (
            (self.w13_scale, self.w13_zero, self.w13_g_idx)
            if which == "w13"
            else (self.w2_scale, self.w2_zero, self.w2_g_idx)
        )
        return scale[e], None if zero is None else zero[e], None if g_idx is None else g_idx[e]


def int4_expert_sizes(w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """(E, N, K) of packed w13 [E, K / 8, 2N] / w2 [E, N / 8, K]; ValueError when they disagree."""
    if w13.dim() != 3 or w2.dim() != 3 or w13.dtype != torch.int32 or w2.dtype != torch.int32:
        raise ValueError(
            f"4-bit experts are int32 [E, K / 8, 2N] / [E, N / 8, K], got {w13.dtype} {tuple(w13.shape)} / "
            f"{w2.dtype} {tuple(w2.shape)}"
        )
    e, k8, two_n = w13.shape
    n, k = two_n // 2, k8 * INT4_PACK
    if two_n % 2 or n % INT4_PACK or tuple(w2.shape) != (e, n // INT4_PACK, k):
        raise ValueError(
            f"4-bit expert weights disagree: w13 {tuple(w13.shape)} is [E, K / 8, 2N] so w2 must be "
            f"{(e, n // INT4_PACK, k)} (N a multiple of 8), got {tuple(w2.shape)}"
        )
    return e, n, k


def check_int4_experts(w13: torch.Tensor, w2: torch.Tensor, int4: Int4ExpertScales) -> None:
    """ValueError unless the packed weights and their scales, zeros and g_idx have the layout's shapes."""
    e, n, k = int4_expert_sizes(w13, w2)
    layout = int4.layout
    for name, cols, rows, scale, zero, g_idx in (
        ("w13", 2 * n, k, int4.w13_scale, int4.w13_zero, int4.w13_g_idx),
        ("w2", k, n, int4.w2_scale, int4.w2_zero, int4.w2_g_idx),
    ):
        # act order: a tensor-parallel rank keeps every group, however many its rows name (module docstring)
        groups = -(-rows // layout.group_size_of(rows))
        if layout.act_order and scale.dim() == 3:
            groups = scale.shape[1]
        if tuple(scale.shape) != (e, groups, cols) or not scale.dtype.is_floating_point:
            raise ValueError(f"{name} scales {scale.dtype} {tuple(scale.shape)}: {layout.describe()} needs float "
                             f"{(e, groups, cols)}")  # fmt: skip
        if (zero is not None) != layout.has_zeros or (
            zero is not None and (zero.dtype != torch.uint8 or zero.shape != scale.shape)
        ):
            raise ValueError(f"{name} zero points must be uint8 {tuple(scale.shape)} exactly when the layout has "
                             f"them ({layout.describe()})")  # fmt: skip
        if (g_idx is not None) != layout.act_order or (
            g_idx is not None and (g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (e, rows))
        ):
            raise ValueError(f"{name} g_idx must be int32 {(e, rows)} exactly when the layout has act order "
                             f"({layout.describe()})")  # fmt: skip


def expert_mlp_int4(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    int4: Int4ExpertScales,
    expert: int,
    activation: str,
) -> torch.Tensor:
    """Expert `expert` of packed w13 / w2 on its tokens x [T, K], the spec (module docstring) -> [T, K]."""
    layout = int4.layout
    k, n = w13.shape[1] * INT4_PACK, w2.shape[1] * INT4_PACK
    scale, zero, g_idx = int4.expert(expert, "w13")
    h = ops.w4a16_linear.native(x, w13[expert], scale, zero, g_idx, None, layout.group_size_of(k))
    scale, zero, g_idx = int4.expert(expert, "w2")
    y = act_and_mul_native(h, activation)
    return ops.w4a16_linear.native(y, w2[expert], scale, zero, g_idx, None, layout.group_size_of(n))


def _quantize(w: torch.Tensor, layout: Int4Layout, g_idx: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """w [n, k] -> (packed [k / 8, n], scales [groups, n] in w's dtype, zeros uint8 [groups, n]) by round to
    nearest: asymmetric scale (max - min) / 15, symmetric amax / 7 around 8."""
    n, k = w.shape
    size = layout.group_size_of(k)
    groups = (torch.arange(k, device=w.device) // size) if g_idx is None else g_idx.long()
    count = -(-k // size)
    wt = w.float().t()  # [k, n]
    q = torch.empty(k, n, dtype=torch.int32, device=w.device)
    scales = torch.empty(count, n, dtype=w.dtype, device=w.device)
    zeros = torch.full((count, n), SYMMETRIC_ZERO, dtype=torch.uint8, device=w.device)
    for g in range(count):
        rows = wt[groups == g]
        if layout.has_zeros:
            low, high = rows.amin(dim=0).clamp(max=0), rows.amax(dim=0).clamp(min=0)
            s = ((high - low) / 15).clamp_min(1e-8).to(w.dtype).float()
            zeros[g] = torch.round(-low / s).clamp(0, 15).to(torch.uint8)
        else:
            s = (rows.abs().amax(dim=0) / 7).clamp_min(1e-8).to(w.dtype).float()
        scales[g] = s.to(w.dtype)
        q[groups == g] = (torch.round(rows / s) + zeros[g].int()).clamp(0, 15).to(torch.int32)
    return pack_int4_rows(q), scales, zeros


@torch.no_grad()
def quantize_experts_int4(
    w13: torch.Tensor, w2: torch.Tensor, layout: Int4Layout, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, Int4ExpertScales]:
    """Model-dtype w13 [E, 2N, K] / w2 [E, K, N] -> (packed w13, packed w2, their scales) in `layout`; act order
    draws one random input order per expert and projection input (seeded), shared by gate and up."""
    e, two_n, k = w13.shape
    n = two_n // 2
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {
        name: [] for name in ("p13", "s13", "z13", "g13", "p2", "s2", "z2", "g2")
    }
    for expert in range(e):
        for tag, w, rows in (("13", w13[expert], k), ("2", w2[expert], n)):
            g_idx = None
            if layout.act_order:
                perm = torch.randperm(rows, generator=gen).to(w.device)
                g_idx = (torch.argsort(perm) // layout.group_size_of(rows)).to(torch.int32)
                parts["g" + tag].append(g_idx)
            packed, scales, zeros = _quantize(w, layout, g_idx)
            parts["p" + tag].append(packed)
            parts["s" + tag].append(scales)
            parts["z" + tag].append(zeros)

    def stack(name: str, keep: bool = True) -> torch.Tensor | None:
        return torch.stack(parts[name]).contiguous() if keep and parts[name] else None

    result = Int4ExpertScales(
        w13_scale=stack("s13"),  # type: ignore[arg-type]
        w2_scale=stack("s2"),  # type: ignore[arg-type]
        w13_zero=stack("z13", layout.has_zeros),
        w2_zero=stack("z2", layout.has_zeros),
        w13_g_idx=stack("g13"),
        w2_g_idx=stack("g2"),
        layout=layout,
    )
    return stack("p13"), stack("p2"), result  # type: ignore[return-value]
