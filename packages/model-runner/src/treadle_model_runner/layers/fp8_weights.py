"""How a projection (layers/linear.py's `Linear`, stacked or row-parallel) holds fp8 weights, in three layouts.

Per channel (`quantize_fp8`, once after loading; `quantization="fp8"`): the weight becomes float8_e4m3fn with one fp32
scale per output channel (`weight_scale`, amax / 448 of the row), the model-dtype copy is freed, and the forward is
`ops.fp8_linear` (activations quantized per token). A row-parallel layer takes each row's amax over every rank's
columns (`Linear.row_amax`), so every rank's fp8 slice is exactly its slice of the one-rank quantization
(column-parallel layers hold whole rows already). Its activations are quantized per token over the rank's own
columns, as vLLM does.

fp8 checkpoints (quantization/checkpoint.py): the projections are built without storage (`projections_on_meta`)
and then given it (`allocate`): float8_e4m3fn weight, fp32 `weight_scale` [out] and, for static activations, fp32
`input_scale` [1], all parameters the checkpoint fills (`load_scale`): the file's fp8 bytes are copied as they are;
a per-tensor weight scale is broadcast to its projection's rows (exact: a stacked shard keeps its own), a
per-channel one [n, 1] taken row by row; a stacked layer's input scale is the largest of its shards' (they
quantize one input). Under tensor parallelism a scale shards with its rows (column-parallel) or is whole on every
rank (row-parallel: each output row is global; the static input scale is per tensor).

Block-wise (`WeightBlocks` in `Linear.weight_block`; a checkpoint with weight_block_size / block_structure, or dummy
weights for one): `weight_scale` is the fp32 grid [ceil(out / block_n), ceil(in / block_k)] of the layer's own
weight, and the forward is `ops.fp8_block_linear` (activations quantized per token in groups of block_k). A
checkpoint's grid for one projection covers its whole (one-rank) shape; this rank keeps the blocks of its rows
(`rank_rows`) and columns (`rank_columns`) and writes them at block row `rank_row_offset / block_n` of its grid, so
q/k/v and gate/up stack along N in block units and tensor parallelism cuts the grid with the weight. That is exact
only when every cut falls on a block boundary, which `block_alignment_problem` checks: each shard a stacked layer
joins, and each tensor-parallel slice, must start on a block and end on one (only the projection's own last rows or
columns may end a block early). Online block quantization (`quantize_fp8(block)`) gives each tile of the local weight
its own amax / 448 scale: with aligned cuts the same tiles, hence the same values, as the one-rank model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from treadle_ir.ops.fp8 import FP8_DTYPE, quantize_with_scale, row_scale
from treadle_ir.ops.fp8_block import num_blocks, quantize_fp8_blocks

if TYPE_CHECKING:
    from treadle_model_runner.layers.linear import Linear

__all__ = ["WeightBlocks", "allocate", "block_alignment_problem", "load_scale", "quantize_fp8"]


@dataclass(frozen=True)
class WeightBlocks:
    block_n: int  # output rows per weight tile
    block_k: int  # input columns per weight tile (and per activation group)
    source: str  # where the block size was read (config.json and its field), named in errors


def _shards(layer: Linear) -> list[str | None]:
    sizes = getattr(layer, "shard_sizes", None)
    return list(sizes) if sizes is not None else [None]


def block_alignment_problem(layer: Linear, blocks: WeightBlocks) -> str | None:
    """Why `layer`'s stacking or tensor-parallel cuts do not fall on `blocks`' boundaries, or None."""
    bn, bk = blocks.block_n, blocks.block_k
    shards = _shards(layer)
    for i, shard in enumerate(shards):
        rows, full = layer.rank_rows(shard), layer.checkpoint_rows(shard)
        what = f"its {shard} shard" if shard is not None else "its output rows"
        if rows.start % bn or (rows.stop % bn and rows.stop != full):
            return f"{what} are cut at rows {rows.start}-{rows.stop} of {full}, not multiples of block_n {bn}"
        if i < len(shards) - 1 and (rows.stop - rows.start) % bn:
            return (
                f"{what} ({rows.stop - rows.start} rows) is not a multiple of block_n {bn}, so the next shard's "
                "blocks would start inside one of its blocks"
            )
    cols, full_cols = layer.rank_columns(), layer.checkpoint_columns()
    if cols.start % bk or (cols.stop % bk and cols.stop != full_cols):
        return f"its input columns are cut at {cols.start}-{cols.stop} of {full_cols}, not multiples of block_k {bk}"
    return None


@torch.no_grad()
def quantize_fp8(layer: Linear, blocks: WeightBlocks | None = None) -> None:
    """Replace the weight by float8_e4m3fn with one fp32 scale per output channel, or (`blocks`) per weight tile;
    the original is freed."""
    if blocks is None:
        scale = row_scale(layer.row_amax(layer.weight.abs().amax(dim=1).float()))  # [out]
        layer.weight = nn.Parameter(quantize_with_scale(layer.weight, scale[:, None]), requires_grad=False)
        layer.weight_scale = scale
        return
    q, grid = quantize_fp8_blocks(layer.weight, blocks.block_n, blocks.block_k)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.weight_scale = grid
    layer.weight_block = blocks


@torch.no_grad()
def allocate(
    layer: Linear, device: torch.device, fp8: bool, static_input: bool, blocks: WeightBlocks | None = None
) -> None:
    """Storage for a layer built under `projections_on_meta`: the weight in the model dtype, or (`fp8`)
    float8_e4m3fn with its fp32 `weight_scale` parameter ([out], or the block grid with `blocks`) and, when
    `static_input`, `input_scale` (zero: a stacked layer's shards raise it to their largest). Every tensor is then
    filled by the checkpoint."""
    dtype = FP8_DTYPE if fp8 else layer.weight.dtype
    layer.weight = nn.Parameter(
        torch.empty(layer.weight.shape, dtype=dtype, device=device), requires_grad=False
    )
    if layer.bias is not None:
        layer.bias = nn.Parameter(torch.empty_like(layer.bias, device=device), requires_grad=False)
    if not fp8:
        return
    shape: tuple[int, ...] = (layer.out_features,)
    if blocks is not None:
        shape = (
            num_blocks(layer.out_features, blocks.block_n),
            num_blocks(layer.in_features, blocks.block_k),
        )
        layer.weight_block = blocks
    layer.weight_scale = nn.Parameter(
        torch.empty(shape, dtype=torch.float32, device=device), requires_grad=False
    )
    if static_input:
        layer.input_scale = nn.Parameter(torch.zeros(1, device=device), requires_grad=False)


@torch.no_grad()
def load_scale(layer: Linear, attr: str, shard: str | None, loaded: torch.Tensor, hf_name: str) -> None:
    """Fill `weight_scale` or `input_scale` from the checkpoint tensor `hf_name` (of stacked shard `shard`)."""
    if attr == "input_scale":
        if loaded.numel() != 1:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tuple(loaded.shape)}; a static input scale is one "
                "value per projection (per-tensor activation quantization)"
            )
        assert layer.input_scale is not None, "allocate(static_input=True) makes input_scale"
        given = loaded.float().reshape(1).to(layer.input_scale.device)
        layer.input_scale.copy_(torch.maximum(layer.input_scale, given))
        return
    assert layer.weight_scale is not None, "allocate(fp8=True) makes weight_scale"
    blocks = layer.weight_block
    if shard is None and len(_shards(layer)) > 1:
        # one checkpoint tensor for every shard of a stacked projection (Phi-3's qkv_proj): each shard takes its rows
        for name, part in _split_stacked_scale(layer, loaded, hf_name, blocks):
            load_scale(layer, attr, name, part, hf_name)
        return
    if blocks is not None:
        _load_block_scale(layer, shard, loaded, hf_name, blocks)
        return
    rows = layer.checkpoint_rows(shard)
    if loaded.numel() == 1:  # per tensor: every row of the projection takes it
        scale = loaded.float().reshape(1).expand(rows)
    elif tuple(loaded.shape) in ((rows,), (rows, 1)):  # per channel
        scale = loaded.float().reshape(rows)
    else:
        raise ValueError(
            f"checkpoint tensor {hf_name!r} has shape {tuple(loaded.shape)}; a weight scale is one value (per "
            f"tensor) or ({rows}, 1) (per output channel of its {rows} rows)"
        )
    part = scale[layer.rank_rows(shard)]  # this rank's rows of the projection
    start = layer.rank_row_offset(shard)
    layer.weight_scale[start : start + part.shape[0]].copy_(part)


def _split_stacked_scale(
    layer: Linear, loaded: torch.Tensor, hf_name: str, blocks: WeightBlocks | None
) -> list[tuple[str, torch.Tensor]]:
    """A stacked projection's weight scale as the checkpoint holds it whole, cut into its shards' scales: per
    tensor, every shard takes the one value; per channel, each shard its rows; block-wise, each shard its block rows
    (a shard must start on a block boundary)."""
    from treadle_model_runner.layers.linear import StackedLinear  # linear.py imports this module

    assert isinstance(layer, StackedLinear), "only a stacked projection has shards"
    full_sizes = layer.full_sizes
    if loaded.numel() == 1:
        return [(name, loaded) for name in full_sizes]
    per_row = 1 if blocks is None else blocks.block_n
    parts, start = [], 0
    for name, rows in full_sizes.items():
        if start % per_row:
            raise ValueError(
                f"checkpoint tensor {hf_name!r}: shard {name!r} of the stacked projection starts at row {start}, "
                f"inside a {per_row}-row block of {blocks.source if blocks else 'scales'}; its scales cannot be cut"
            )
        parts.append((name, loaded[start // per_row : num_blocks(start + rows, per_row)]))
        start += rows
    return parts


def _load_block_scale(
    layer: Linear, shard: str | None, loaded: torch.Tensor, hf_name: str, blocks: WeightBlocks
) -> None:
    bn, bk = blocks.block_n, blocks.block_k
    rows, cols = layer.checkpoint_rows(shard), layer.checkpoint_columns()
    grid = (num_blocks(rows, bn), num_blocks(cols, bk))
    if tuple(loaded.shape) != grid:
        raise ValueError(
            f"checkpoint tensor {hf_name!r} has shape {tuple(loaded.shape)}; with {blocks.source} its [{rows}, "
            f"{cols}] weight has {grid} block scales (one per {bn} x {bk} tile, the last ones ragged): the files "
            "and config.json disagree"
        )
    r, c = layer.rank_rows(shard), layer.rank_columns()
    part = loaded.float()[r.start // bn : num_blocks(r.stop, bn), c.start // bk : num_blocks(c.stop, bk)]
    assert layer.weight_scale is not None and layer.rank_row_offset(shard) % bn == 0, "aligned at allocation"
    start = layer.rank_row_offset(shard) // bn
    layer.weight_scale[start : start + part.shape[0]].copy_(part)
