"""A 4-bit checkpoint's tensors in treadle's one layout (treadle_ir.ops.int4), projection by projection.

Each format stores a projection of n outputs and k inputs as (names after the projection's, e.g. `q_proj.qweight`):
- AWQ: `qweight` int32 [k, n / 8], nibble i of word [r, c] holding column 8c + AWQ_ORDER[i] (AutoAWQ interleaves
  them); `qzeros` int32 [groups, n / 8] in the same order; `scales` [groups, n];
- GPTQ: `qweight` int32 [k / 8, n], nibble j of word [i, c] holding row 8i + j (the layout itself);
  `qzeros` int32 [groups, n / 8], nibble j holding column 8c + j, plus `zero_offset` (1 in v1 files); `scales`
  [groups, n]; `g_idx` int32 [k];
- compressed-tensors: `weight_packed` int32 [n, k / 8], nibble j of word [c, i] holding row 8i + j of column c;
  `weight_scale` [n, groups]; `weight_zero_point` int32 [n / 8, groups] packed along n; `weight_shape` [n, k];
  `weight_g_idx` [k]. Values and zero points are stored signed plus 8, i.e. as the unsigned 0..15 the layout uses.
`to_layout` turns one projection's tensors into the layout's `packed_weight` [k / 8, n], `group_scale` [groups, n]
(the file's dtype; the projection casts it), `group_zero` uint8 [groups, n] (not for symmetric schemes: every zero
point is 8) and `group_index` [k] (act order only), checking that the tensors agree with each other; the projection
checks them against its own shape when it takes them (layers/linear_int4.py).
"""

from __future__ import annotations

import torch

from treadle_ir.ops.int4 import INT4_PACK, pack_int4_rows
from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme

__all__ = ["AWQ_ORDER", "file_tensors", "to_layout"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_SEQUENTIAL = tuple(range(INT4_PACK))


def file_tensors(scheme: Int4CheckpointScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor names of one quantized projection in `scheme`'s files; optional ones are read
    only to be checked or dropped (GPTQ's symmetric qzeros, a g_idx without act order, compressed-tensors' shape)."""
    if scheme.quant_method == "awq":
        return ("qweight", "qzeros", "scales"), ()
    if scheme.quant_method == "gptq":
        required = ["qweight", "scales"] + ([] if scheme.symmetric else ["qzeros"])
        required += ["g_idx"] if scheme.act_order else []
        optional = [n for n in ("qzeros", "g_idx") if n not in required]
        return tuple(required), tuple(optional)
    required = ["weight_packed", "weight_scale"] + ([] if scheme.symmetric else ["weight_zero_point"])
    required += ["weight_g_idx"] if scheme.act_order else []
    return tuple(required), ("weight_shape", *(() if scheme.act_order else ("weight_g_idx",)))


def _unpack_columns(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [r, c / 8] whose word nibble i holds column 8 * word + order[i] -> [r, c] int32 in 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # [r, c / 8, 8]
    inverse = sorted(range(INT4_PACK), key=lambda i: order[i])  # column j of a word is nibble inverse[j]
    return nibbles[..., inverse].reshape(packed.shape[0], -1)


def _check(ok: bool, module: str, what: str) -> None:
    if not ok:
        raise ValueError(
            f"checkpoint tensors of {module}: {what}; the files do not match config.json's layout"
        )


def _shape(tensors: dict[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return tuple(tensors[name].shape)


def to_layout(
    scheme: Int4CheckpointScheme, module: str, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One projection's file tensors (by short name: `qweight`, ...) as the layout's (`packed_weight`, ...)."""
    zeros: torch.Tensor | None  # [groups, n] as stored (0..15)
    if scheme.quant_method == "awq":
        q = _unpack_columns(tensors["qweight"], AWQ_ORDER)  # [k, n]
        scales = tensors["scales"]
        zeros = _unpack_columns(tensors["qzeros"], AWQ_ORDER)
        _check(
            q.shape[0] % INT4_PACK == 0,
            module,
            f"qweight {_shape(tensors, 'qweight')}: k not a multiple of 8",
        )
        packed, k, n = pack_int4_rows(q), q.shape[0], q.shape[1]
    elif scheme.quant_method == "gptq":
        packed, scales = tensors["qweight"].to(torch.int32), tensors["scales"]
        k, n = packed.shape[0] * INT4_PACK, packed.shape[1]
        zeros = _unpack_columns(tensors["qzeros"], _SEQUENTIAL) if "qzeros" in tensors else None
    else:
        rows = _unpack_columns(tensors["weight_packed"], _SEQUENTIAL)  # [n, k (padded to 8)]
        n, k = rows.shape
        if "weight_shape" in tensors:
            shape = tuple(int(v) for v in tensors["weight_shape"].reshape(-1))
            _check(
                shape == (n, k),
                module,
                f"weight_shape {shape} is not weight_packed's {(n, k)} (k a multiple of 8)",
            )
        packed, scales = pack_int4_rows(rows.t()), tensors["weight_scale"].t()
        zero_point = tensors.get("weight_zero_point")
        zeros = (
            None if zero_point is None else _unpack_columns(zero_point.t().contiguous(), _SEQUENTIAL)[:, :n]
        )
    groups = scales.shape[0]
    _check(
        scales.dim() == 2 and scales.shape[1] == n, module, f"scales {tuple(scales.shape)} for {n} outputs"
    )
    layout = {"packed_weight": packed.contiguous(), "group_scale": scales.contiguous()}
    if not scheme.symmetric:
        assert zeros is not None, "asymmetric schemes require their zero points (file_tensors)"
        _check(
            tuple(zeros.shape) == (groups, n),
            module,
            f"zero points {tuple(zeros.shape)}, scales {(groups, n)}",
        )
        layout["group_zero"] = (zeros + scheme.zero_offset).to(torch.uint8).contiguous()
    g_idx = tensors.get("g_idx", tensors.get("weight_g_idx"))
    if scheme.act_order:
        assert g_idx is not None, "act-order schemes require g_idx (file_tensors)"
        _check(tuple(g_idx.shape) == (k,), module, f"g_idx {tuple(g_idx.shape)} for {k} input rows")
        in_range = g_idx.numel() == 0 or (int(g_idx.min()) >= 0 and int(g_idx.max()) < groups)
        _check(in_range, module, f"g_idx names groups outside the {groups} of its scales")
        layout["group_index"] = g_idx.to(torch.int32).contiguous()
    return layout
