"""4-bit experts of a FusedMoE layer: their storage, loading one expert projection, quantizing loaded weights.

A FusedMoE holds 4-bit experts (experts/int4.py) as parameters beside its packed `w13_weight` int32 [E, K / 8, 2N]
and `w2_weight` int32 [E, N / 8, K]: `w13_group_scale` [E, groups13, 2N] and `w2_group_scale` [E, groups2, K] in the
model dtype, `w13_group_zero` / `w2_group_zero` uint8 of the same shapes (asymmetric layouts), `w13_group_index`
int32 [E, K] / `w2_group_index` int32 [E, N] (act order). N is the layer's own (a tensor-parallel rank's) width,
E its own experts (expert parallelism: this rank's range; expert ids stay global, treadle_moe/placement.py).
- `allocate_int4`: empty storage for a checkpoint's experts (the layer may have been built on the meta device);
- `load_int4_expert`: one expert projection's tensor, already in the layout and cut to this rank (gate / up:
  packed [K / 8, N], scales and zeros [groups, N], g_idx [K]; down: packed [N / 8, K], [groups, K], g_idx [N]),
  copied into the expert's gate columns, up columns or down slab. The gate and up projections share one g_idx
  (they read the same input): the second one loaded must equal the first, else a ValueError names both;
- `quantize_int4`: model-dtype experts replaced by their round-to-nearest 4-bit form (dummy weights, tests).
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_ir.ops.int4 import INT4_PACK
from treadle_moe.expert_bias import check_unquantized
from treadle_moe.experts.int4 import Int4Layout, quantize_experts_int4
from treadle_moe.layer import INT4_PARAMS, FusedMoE

__all__ = ["INT4_ATTRS", "allocate_int4", "load_int4_expert", "quantize_int4"]

# a projection's tensors in treadle's layout (treadle_ir.ops.int4) -> the FusedMoE parameter suffix
INT4_ATTRS = {"packed_weight": "weight", "group_scale": "group_scale", "group_zero": "group_zero",
              "group_index": "group_index"}  # fmt: skip


def _set(moe: FusedMoE, name: str, t: torch.Tensor | None) -> None:
    if t is None:
        if name in moe._parameters:
            del moe._parameters[name]
        return
    param = nn.Parameter(t, requires_grad=False)
    param.weight_loader = moe.weight_loader  # type: ignore[attr-defined]
    setattr(moe, name, param)


def allocate_int4(
    moe: FusedMoE,
    layout: Int4Layout,
    groups13: int,
    groups2: int,
    scale_dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> None:
    """Storage for 4-bit experts in `layout` with `groups13` / `groups2` scale rows (module docstring)."""
    check_unquantized(moe, "4-bit")
    e, k, n = moe.placement.num_local, moe.hidden_size, moe.intermediate_size
    if k % INT4_PACK or n % INT4_PACK:
        raise ValueError(
            f"4-bit experts pack eight input rows to a word: hidden size {k} and this rank's expert width {n} must "
            f"be multiples of {INT4_PACK}"
        )
    _set(moe, "w13_weight", torch.empty(e, k // INT4_PACK, 2 * n, dtype=torch.int32, device=device))
    _set(moe, "w2_weight", torch.empty(e, n // INT4_PACK, k, dtype=torch.int32, device=device))
    for w, groups, cols, rows in (("w13", groups13, 2 * n, k), ("w2", groups2, k, n)):
        _set(moe, f"{w}_group_scale", torch.empty(e, groups, cols, dtype=scale_dtype, device=device))
        zero = torch.empty(e, groups, cols, dtype=torch.uint8, device=device) if layout.has_zeros else None
        _set(moe, f"{w}_group_zero", zero)
        index = torch.empty(e, rows, dtype=torch.int32, device=device) if layout.act_order else None
        _set(moe, f"{w}_group_index", index)
    moe.int4_layout = layout
    moe.int4_index_from = {}


@torch.no_grad()
def load_int4_expert(
    moe: FusedMoE, attr: str, shard: str, expert: int, tensor: torch.Tensor, hf_name: str
) -> None:
    """Copy one expert projection's `attr` (a key of INT4_ATTRS), this rank's part, into its place; `expert` is
    global, and another rank's expert (expert parallelism) is ignored."""
    assert moe.int4_layout is not None, "allocate_int4 first"
    local = moe.placement.local_id(expert)
    if local is None:
        return
    w = "w2" if shard == "w2" else "w13"
    param: torch.Tensor = getattr(moe, f"{w}_{INT4_ATTRS[attr]}")
    target = param.data[local]
    n = moe.intermediate_size
    if attr == "group_index":
        if shard != "w2":
            held = moe.int4_index_from
            if expert in held and not torch.equal(target.cpu(), tensor.to(torch.int32).cpu()):
                raise ValueError(
                    f"checkpoint tensor {hf_name!r} orders expert {expert}'s input rows differently from its "
                    f"{held[expert]} projection's g_idx; treadle runs gate and up as one fused projection, which "
                    "reads its input once"
                )
            held.setdefault(expert, shard)
    elif shard == "w1":
        target = target[:, :n]
    elif shard == "w3":
        target = target[:, n:]
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(
            f"checkpoint tensor {hf_name!r} is {tuple(tensor.shape)} in treadle's 4-bit layout (this rank's part), "
            f"the model expects {tuple(target.shape)}: check hidden_size / moe_intermediate_size and the group "
            "size against the checkpoint"
        )
    target.copy_(tensor)


@torch.no_grad()
def quantize_int4(moe: FusedMoE, layout: Int4Layout, seed: int = 0) -> None:
    """Replace loaded model-dtype experts by their 4-bit form in `layout` (round to nearest; experts/int4.py)."""
    check_unquantized(moe, "4-bit")
    p13, p2, s = quantize_experts_int4(moe.w13_weight, moe.w2_weight, layout, seed)
    _set(moe, "w13_weight", p13)
    _set(moe, "w2_weight", p2)
    tensors = (s.w13_scale, s.w13_zero, s.w13_g_idx, s.w2_scale, s.w2_zero, s.w2_g_idx)
    for name, t in zip(INT4_PARAMS, tensors, strict=True):
        _set(moe, name, t)
    moe.int4_layout = layout
