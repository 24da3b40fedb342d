"""4-bit routed experts of a W4A16 checkpoint (GPTQ, AWQ, compressed-tensors): storage, this rank's part, dummies.

GPTQ / AWQ / compressed-tensors MoE checkpoints (Qwen3-30B-A3B-GPTQ-Int4 style) store every expert projection as a
projection of its own (`mlp.experts.{e}.gate_proj.qweight` ...); int4_checkpoint.py's `layout_weights` repacks each
into treadle's layout (`...experts.{e}.gate_proj.packed_weight`, `group_scale`, `group_zero`, `group_index`) and the
expert loader (models/expert_loader.py) hands them to `load_expert`, which keeps this rank's part and copies it into
the FusedMoE's stacked layout (treadle_moe.int4_layer). The router (`mlp.gate`, an `nn.Linear`) and Qwen2-MoE's
`shared_expert_gate` are no projections here: they load in the model dtype (a checkpoint quantizing them fails by
tensor name); the shared expert's projections are ordinary 4-bit projections.
- `allocate_experts`: 4-bit storage for the layers whose experts the scheme quantizes (every gate, up and down
  projection as the files name them), the model dtype for those it leaves alone; a layer whose experts disagree is
  a ValueError.
- Tensor parallelism cuts each expert's intermediate width N: gate and up by output columns (every group kept, g_idx
  whole), down by input rows in whole groups, so this rank's N / tp must be a multiple of the group size (else a
  ValueError names group_size and the expert width field, e.g. moe_intermediate_size, and the sizes that work);
  with act order a rank keeps every group of down (its rows' g_idx may name any) and its rows' g_idx.
- `fill_dummy_experts`: random codes, scales (about the dummy loader's weight size) and zero points per (layer,
  expert, projection) from the seed, at the full size and then cut, so N ranks join to the one-rank model.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from treadle_ir.ops.int4 import INT4_PACK
from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme
from treadle_moe import FusedMoE, Int4Layout
from treadle_moe.int4_layer import allocate_int4, load_int4_expert

__all__ = ["allocate_experts", "fill_dummy_experts", "load_expert"]

_CODE_SPREAD = 4.6  # standard deviation of uniform codes 0..15 around 8


def _layout(scheme: Int4CheckpointScheme) -> Int4Layout:
    return Int4Layout(scheme.group_size, has_zeros=not scheme.symmetric, act_order=scheme.act_order)


def _ranks(moe: FusedMoE) -> tuple[int, int, int]:
    """(rank, tp size, the experts' full intermediate width)."""
    return (
        int(getattr(moe, "rank", 0)),
        int(getattr(moe, "tp_size", 1)),
        int(getattr(moe, "full_intermediate", moe.intermediate_size)),
    )


def _groups(moe: FusedMoE, layout: Int4Layout, model: nn.Module, name: str) -> tuple[int, int]:
    """(w13 groups, w2 groups this rank keeps); ValueError when tensor parallelism cuts a down group."""
    k, n = moe.hidden_size, moe.intermediate_size
    _, tp, full = _ranks(moe)
    size2 = layout.group_size_of(full)
    groups13 = -(-k // layout.group_size_of(k))
    if layout.act_order or size2 >= full:
        return groups13, -(-full // size2)
    if tp > 1 and n % size2:
        field = getattr(model, "expert_width_field", "moe_intermediate_size")
        sizes = [t for t in range(1, tp) if full % t == 0 and (full // t) % size2 == 0]
        raise ValueError(
            f"the 4-bit experts of {name} cannot be cut for tensor parallelism in whole groups: config.json's {field} "
            f"({full}) / tensor_parallel_size ({tp}) = {n} down-projection input rows per rank is not a multiple of "
            f"quantization_config's group_size ({size2}); use tensor_parallel_size "
            f"{' or '.join(map(str, sizes)) or '1'}"
        )
    return groups13, -(-n // size2)


def allocate_experts(model: nn.Module, scheme: Int4CheckpointScheme, device: torch.device) -> int:
    """Storage for the FusedMoE layers of a model built on the meta device (module docstring); returns how many
    layers are 4-bit."""
    layout = _layout(scheme)
    projections = list(
        getattr(model, "expert_proj_names", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
    )
    checkpoint_name = getattr(model, "checkpoint_name", lambda name: name)
    count = 0
    for name, moe in [(n, m) for n, m in model.named_modules() if isinstance(m, FusedMoE)]:
        held = {checkpoint_name(f"{name}.{e}.{p}"): scheme.quantizes(checkpoint_name(f"{name}.{e}.{p}"))
                for e in range(moe.num_experts) for p in projections}  # fmt: skip
        if all(held.values()):
            groups13, groups2 = _groups(moe, layout, model, name)
            if moe.intermediate_size % INT4_PACK:
                raise ValueError(f"the 4-bit experts of {name} hold {moe.intermediate_size} intermediate columns "
                                 f"on this rank, not a multiple of {INT4_PACK}: use a smaller tensor_parallel_size")  # fmt: skip
            allocate_int4(moe, layout, groups13, groups2, moe.w13_weight.dtype, device)
            count += 1
        elif any(held.values()):
            quantized = [n for n, q in held.items() if q][:2]
            plain = [n for n, q in held.items() if not q][:2]
            raise ValueError(
                f"the checkpoint's quantization_config makes {', '.join(quantized)} 4-bit but leaves "
                f"{', '.join(plain)} unquantized; treadle runs the experts of {name} as one fused layer, which needs "
                "one weight format: quantize all of its experts or none"
            )
        else:
            moe.allocate(device)
    return count


def rank_part(moe: FusedMoE, shard: str, attr: str, full: torch.Tensor, hf_name: str) -> torch.Tensor:
    """This rank's part of one expert projection's tensor `attr` in the layout at its full (one-rank) shape."""
    layout = moe.int4_layout
    assert layout is not None, "4-bit experts are allocated first"
    rank, tp, n_full = _ranks(moe)
    k, n = moe.hidden_size, moe.intermediate_size
    rows, cols = (n_full, k) if shard == "w2" else (k, n_full)
    size = layout.group_size_of(rows)
    groups = -(-rows // size)
    expected = {"packed_weight": (rows // INT4_PACK, cols), "group_scale": (groups, cols),
                "group_zero": (groups, cols), "group_index": (rows,)}[attr]  # fmt: skip
    if tuple(full.shape) != expected:
        raise ValueError(
            f"checkpoint tensor {hf_name!r} has shape {tuple(full.shape)} in treadle's 4-bit layout, the model "
            f"expects {expected} (an expert projection of {rows} inputs, {cols} outputs, {groups} groups): the "
            "checkpoint does not match config.json"
        )
    if tp == 1:
        return full
    mine = slice(rank * n, (rank + 1) * n)
    if shard != "w2":  # gate / up: this rank's output columns
        return full if attr == "group_index" else full[:, mine]
    if attr == "packed_weight":
        return full[mine.start // INT4_PACK : mine.stop // INT4_PACK]
    if attr == "group_index":
        return full[mine]
    if layout.act_order or size >= rows:
        return full  # every group (act order), or the one group per column
    return full[mine.start // size : mine.stop // size]


def load_expert(moe: FusedMoE, shard: str, attr: str, expert: int, full: torch.Tensor, hf_name: str) -> None:
    """Keep this rank's part of `full` and copy it into the layer's stacked 4-bit layout."""
    part = rank_part(moe, shard, attr, full, hf_name)
    param = getattr(moe, "w2_group_scale" if shard == "w2" else "w13_group_scale")
    if attr == "group_scale":
        part = part.to(param.dtype)
    elif attr == "group_index":
        part = part.to(torch.int32)
    load_int4_expert(moe, attr, shard, expert, part, hf_name)


@torch.no_grad()
def fill_dummy_experts(moe: FusedMoE, name: str, seed: int, std: float) -> None:
    """Random 4-bit experts (module docstring), a function of (seed, name, expert, projection) only."""
    layout = moe.int4_layout
    assert layout is not None, "4-bit experts are allocated first"
    _, _, n_full = _ranks(moe)
    k = moe.hidden_size
    device = moe.w13_weight.device
    for e in moe.placement.local_experts:  # under expert parallelism, this rank's
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}:{e}".encode())) % (1 << 63))
        order = torch.randperm(k, generator=gen, device=device)  # gate and up read one input: one act order
        for shard, rows, cols in (("w1", k, n_full), ("w3", k, n_full), ("w2", n_full, k)):
            size = layout.group_size_of(rows)
            groups = -(-rows // size)
            words = torch.randint(-(1 << 31), 1 << 31, (rows // INT4_PACK, cols), generator=gen, device=device,
                                  dtype=torch.int64)  # fmt: skip
            spread = torch.rand(groups, cols, generator=gen, device=device) + 0.5
            tensors = {"packed_weight": words.to(torch.int32), "group_scale": spread * (std / _CODE_SPREAD)}
            if layout.has_zeros:
                tensors["group_zero"] = torch.randint(7, 10, (groups, cols), generator=gen, device=device).to(
                    torch.uint8
                )
            if layout.act_order:
                perm = order if shard != "w2" else torch.randperm(rows, generator=gen, device=device)
                tensors["group_index"] = torch.argsort(perm) // size
            for attr, tensor in tensors.items():
                load_expert(moe, shard, attr, e, tensor, f"{name}.{e}.{shard}.{attr} (dummy)")
