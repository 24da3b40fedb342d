"""Copying one expert's checkpoint matrix (or its fp8 scale) into a FusedMoE's stacked parameters.

A FusedMoE stacks its experts: w13 [E_local, 2N, K] (gate rows, then up rows), w2 [E_local, K, N], the fp8 weight
scales alike (per channel [E_local, 2N] / [E_local, K], block-wise the gate grid's block rows, then the up grid's)
and the static input scales [E, 2] / [E] of every expert. `copy_expert_weight` is what the layer's vLLM-style
`weight_loader` does: it checks the shard and the global expert id, ignores an expert another rank holds (expert
parallelism, placement.py), finds the expert's part of the parameter and copies the tensor into it after checking
its shape (fp8 scales as fp32; a per-channel scale stored [rows, 1] squeezed; one input scale value reshaped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from treadle_moe.layer import FusedMoE

SHARD_IDS = ("w1", "w3", "w2")  # gate, up, down


def copy_expert_weight(
    moe: FusedMoE,
    param: nn.Parameter,
    loaded_weight: torch.Tensor,
    weight_name: str,
    shard_id: str,
    expert_id: int,
) -> None:
    """Copy global expert `expert_id`'s gate ("w1"), up ("w3") or down ("w2") matrix (or scale) into `param`."""
    if shard_id not in SHARD_IDS:
        raise ValueError(f"shard_id {shard_id!r} of {weight_name} is unknown; valid: {', '.join(SHARD_IDS)}")
    if not 0 <= expert_id < moe.num_experts:
        raise ValueError(f"expert_id {expert_id} of {weight_name} is out of range [0, {moe.num_experts})")
    is_input_scale = param is moe.w13_input_scale or param is moe.w2_input_scale
    local_id = expert_id if is_input_scale else moe.placement.local_id(expert_id)
    if local_id is None:  # another rank's expert
        return
    target = _expert_part(moe, param, shard_id, local_id)
    if is_input_scale:
        loaded_weight = (
            loaded_weight.float().reshape(target.shape) if loaded_weight.numel() == 1 else loaded_weight
        )
    if param is moe.w13_weight_scale or param is moe.w2_weight_scale:
        if tuple(loaded_weight.shape) == (*target.shape, 1):  # a per-channel scale stored [rows, 1]
            loaded_weight = loaded_weight[..., 0]
        loaded_weight = loaded_weight.float()
    if tuple(loaded_weight.shape) != tuple(target.shape):
        raise ValueError(
            f"{weight_name} (expert {expert_id}, {shard_id}) has shape {tuple(loaded_weight.shape)}, expected "
            f"{tuple(target.shape)}; check hidden_size / intermediate_size (and the fp8 block size) against the "
            "checkpoint"
        )
    target.copy_(loaded_weight)


def _expert_part(moe: FusedMoE, param: nn.Parameter, shard_id: str, expert: int) -> torch.Tensor:
    """The slice of `param` (a weight or an fp8 scale) holding expert `expert`'s gate, up or down matrix (`expert`:
    the layer's own index, global for the input scales)."""
    if param is moe.w13_input_scale:
        return param.data[expert, SHARD_IDS.index(shard_id)]  # one value: the gate's or the up's
    if shard_id == "w2":
        return param.data[expert]  # weight [K, N]; scale [K] or its block grid; input scale one value
    rows = moe.intermediate_size  # gate rows, then up rows
    layout = moe.fp8_layout
    if param is moe.w13_weight_scale and layout is not None and layout.block is not None:
        rows = param.shape[1] // 2  # block rows of the gate grid
    return param.data[expert, :rows] if shard_id == "w1" else param.data[expert, rows:]
