"""A projection holding 4-bit weights (W4A16 checkpoints): its storage, how it takes a checkpoint's tensors, dummy values.

`allocate_int4` replaces a `Linear`'s weight (built on the meta device) by the layout of treadle_ir.ops.int4, for its
k_local input and n_local output features: `packed_weight` int32 [k_local / 8, n_local], `group_scale` [groups,
n_local] in the model dtype, `group_zero` uint8 [groups, n_local] (zero points: not for symmetric checkpoints) and
`group_index` int32 [k_local] (act order); `weight` becomes None and the forward is `ops.w4a16_linear`.

Every tensor is n-major (output columns last), so a stacked layer's shards are column blocks and tensor parallelism
cuts along n for a column-parallel layer (each rank's output columns of each shard) and along k for a row-parallel
one (o_proj, down_proj), in whole groups: a rank's k_local rows must be a multiple of the group size, and its groups
are the ones its rows cover. An act-order row-parallel layer's rows may belong to any group, so every rank keeps all
groups' scales and zero points, as vLLM does, and its rows' slice of g_idx. Per-channel scales (one group) are whole
on every rank. A stacked layer's shards read the same input, so their g_idx (which follows the input's activation
order) must agree: the first shard's is kept and the others are checked against it.

`load_int4(layer, attr, shard, full, hf_name)` takes one tensor of a checkpoint projection in the layout at its full
(one-rank) shape, checks that shape, and keeps this rank's part in the shard's columns. A checkpoint that holds a
stacked projection whole (Phi-3's qkv_proj and gate_up_proj: AutoAWQ and GPTQ quantize the HF module, one set of
tensors with every shard's columns and one g_idx) comes as shard None: its columns are cut into the shards', each
then cut for this rank as a shard of its own (under tensor parallelism: the rank's q columns, k columns, v columns). `fill_dummy_int4` draws such
tensors at random, per shard from a seed and the layer's name, and loads them the same way, so N ranks still join to
the one-rank model: codes uniform in 0..15, zero points 8 +- 1 (or none), scales around DUMMY_STD / 4.6 (4.6 is the
spread of uniform codes around 8), i.e. weights of about the dummy loader's size.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from treadle_ir.ops.int4 import INT4_PACK

if TYPE_CHECKING:
    from treadle_model_runner.layers.linear import Linear

__all__ = ["INT4_TENSORS", "Int4Layout", "allocate_int4", "fill_dummy_int4", "load_int4"]

INT4_TENSORS = ("packed_weight", "group_scale", "group_zero", "group_index")
_CODE_SPREAD = 4.6  # standard deviation of uniform codes 0..15 around 8


@dataclass(frozen=True)
class Int4Layout:
    group_size: int  # input rows per group in the checkpoint; -1: one group per output column
    has_zeros: bool  # zero points stored (asymmetric); else every zero point is 8
    act_order: bool  # group_index per input row


def _groups(layer: Linear, layout: Int4Layout) -> tuple[int, int, slice]:
    """(group size on this rank, groups in the checkpoint, the groups this rank keeps)."""
    k_full, k_local, cols = layer.checkpoint_columns(), layer.in_features, layer.rank_columns()
    if layout.group_size == -1 or layout.group_size >= k_full:
        return k_full, 1, slice(0, 1)
    size = layout.group_size
    total = -(-k_full // size)
    if layout.act_order:
        return size, total, slice(0, total)
    if cols.start % size or (k_local % size and cols.stop != k_full):
        raise ValueError(
            f"a tensor-parallel rank holds input columns [{cols.start}, {cols.stop}) of a projection with "
            f"{k_full} inputs, which cuts its groups of {size}: use a tensor parallel size that divides "
            f"{k_full // size} groups"
        )
    return size, total, slice(cols.start // size, -(-cols.stop // size))


@torch.no_grad()
def allocate_int4(layer: Linear, layout: Int4Layout, device: torch.device, name: str) -> None:
    """Give a projection built on the meta device its 4-bit storage (see the module docstring); `name` for errors."""
    k, n, dtype = layer.in_features, layer.out_features, layer.weight.dtype
    if k % INT4_PACK:
        raise ValueError(
            f"{name} holds {k} input columns on this rank, not a multiple of {INT4_PACK}: 4-bit weights are packed "
            "eight input rows to a word; use a tensor parallel size that keeps them whole"
        )
    size, _, kept = _groups(layer, layout)
    groups = kept.stop - kept.start
    layer.register_parameter("weight", None)
    params = {"packed_weight": torch.empty(k // INT4_PACK, n, dtype=torch.int32, device=device),
              "group_scale": torch.empty(groups, n, dtype=dtype, device=device)}  # fmt: skip
    if layout.has_zeros:
        params["group_zero"] = torch.empty(groups, n, dtype=torch.uint8, device=device)
    if layout.act_order:
        params["group_index"] = torch.empty(k, dtype=torch.int32, device=device)
    for attr, tensor in params.items():
        setattr(layer, attr, nn.Parameter(tensor, requires_grad=False))
    if layer.bias is not None:
        layer.bias = nn.Parameter(torch.empty_like(layer.bias, device=device), requires_grad=False)
    layer.group_size = size
    layer.int4_layout = layout
    layer.group_index_shard = None  # the stacked shard whose g_idx the layer holds


def _columns(layer: Linear, shard: str | None) -> slice:
    """The columns of the layer's parameters that hold `shard` (all of them, unless stacked)."""
    offsets, sizes = getattr(layer, "shard_offsets", None), getattr(layer, "shard_sizes", None)
    if shard is None or offsets is None or sizes is None:
        return slice(0, layer.out_features)
    return slice(offsets[shard], offsets[shard] + sizes[shard])


def _layout(layer: Linear) -> Int4Layout:
    assert layer.int4_layout is not None, "allocate_int4 gives a projection its 4-bit layout"
    return layer.int4_layout


@torch.no_grad()
def load_int4(layer: Linear, attr: str, shard: str | None, full: torch.Tensor, hf_name: str) -> None:
    """Keep this rank's part of `full`, checkpoint tensor `hf_name` in the layout (`attr` names which), in `shard`."""
    layout = _layout(layer)
    k_full, n_full = layer.checkpoint_columns(), layer.checkpoint_rows(shard)
    _, total, kept = _groups(layer, layout)
    cols = layer.rank_columns()
    expected = {"packed_weight": (k_full // INT4_PACK, n_full), "group_scale": (total, n_full),
                "group_zero": (total, n_full), "group_index": (k_full,)}[attr]  # fmt: skip
    if tuple(full.shape) != expected:
        raise ValueError(
            f"checkpoint tensor {hf_name!r} has shape {tuple(full.shape)} in treadle's 4-bit layout, the model "
            f"expects {expected} ({n_full} outputs, {k_full} inputs, {total} groups): the checkpoint does not match "
            "config.json"
        )
    full_sizes: dict[str, int] | None = getattr(layer, "full_sizes", None)
    if shard is None and full_sizes is not None and attr != "group_index":
        # one checkpoint projection for every shard (Phi-3's qkv_proj, quantized whole as AutoAWQ and GPTQ store it):
        # its output columns are the shards' one after the other, and each shard keeps this rank's part of its own
        for name, part in zip(full_sizes, full.split(list(full_sizes.values()), dim=-1), strict=True):
            load_int4(layer, attr, name, part, hf_name)
        return
    param = getattr(layer, attr)
    if attr == "group_index":
        part = full[cols].to(torch.int32)
        if layer.group_index_shard is not None and not torch.equal(param.cpu(), part.cpu()):
            raise ValueError(
                f"checkpoint tensor {hf_name!r} orders the input rows differently from the {layer.group_index_shard} "
                "projection's g_idx; treadle runs them as one fused projection, which reads its input once"
            )
        param.copy_(part)
        layer.group_index_shard = shard or "first"
        return
    rows = layer.rank_rows(shard)
    if attr == "packed_weight":
        part = full[cols.start // INT4_PACK : cols.stop // INT4_PACK, rows]
    else:
        part = full[kept, rows]
    param[:, _columns(layer, shard)] = part.to(param.dtype)


def _full_shard(
    layer: Linear, layout: Int4Layout, shard: str | None, gen: torch.Generator, std: float
) -> dict:
    k, n = layer.checkpoint_columns(), layer.checkpoint_rows(shard)
    _, total, _ = _groups(layer, layout)
    device = gen.device
    words = torch.randint(
        -(1 << 31), 1 << 31, (k // INT4_PACK, n), generator=gen, device=device, dtype=torch.int64
    )
    spread = torch.rand(total, n, generator=gen, device=device) + 0.5
    tensors = {"packed_weight": words.to(torch.int32), "group_scale": spread * (std / _CODE_SPREAD)}
    if layout.has_zeros:
        tensors["group_zero"] = torch.randint(7, 10, (total, n), generator=gen, device=device).to(torch.uint8)
    return tensors


@torch.no_grad()
def fill_dummy_int4(layer: Linear, name: str, seed: int, std: float) -> None:
    """Random 4-bit values for a projection (see the module docstring), a function of (seed, name, shard) only."""
    layout = _layout(layer)
    shards = list(getattr(layer, "shard_sizes", {})) or [None]
    device = layer.group_scale.device if layer.group_scale is not None else torch.device("cpu")
    for shard in shards:
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}:{shard}".encode())) % (1 << 63))
        for attr, tensor in _full_shard(layer, layout, shard, gen, std).items():
            load_int4(layer, attr, shard, tensor, f"{name}.{attr} (dummy)")
        if layout.act_order:  # one activation order per input, whatever the shard
            gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
            k = layer.checkpoint_columns()
            perm = torch.randperm(k, generator=gen, device=device)
            load_int4(layer, "group_index", shard, torch.argsort(perm) // layer.group_size, f"{name}.g_idx")
