"""4-bit integer weights with 16-bit activations (W4A16): the one packed layout, and ``w4a16_linear`` on it.

AWQ, GPTQ and compressed-tensors "pack-quantized" checkpoints all store a projection's weight [n, k] as unsigned 4-bit
integers q with a scale s and a zero point z per (group of input columns, output column); each packs them its own
way. The loader repacks all three into this layout (model-runner quantization/int4_formats.py), so one op and one
kernel per platform serve them:

- ``packed_weight`` int32 [k / 8, n]: bits 4j .. 4j + 3 of word [i, c] hold q[8i + j, c] in 0..15 (eight consecutive
  input rows of one output column per word, lowest bits first: GPTQ's ``qweight`` layout, whose output columns are
  contiguous, so a kernel's loads of a [rows, columns] tile are coalesced along the columns);
- ``scales`` [num_groups, n] float (the model dtype): s[g, c];
- ``zeros`` uint8 [num_groups, n] or None: z[g, c] in 0..16 (16: a GPTQ v1 file's stored 15, plus its offset 1);
  None is symmetric quantization, z = 8 everywhere;
- ``g_idx`` int32 [k] or None: the group of input row r (act-order checkpoints, GPTQ ``desc_act``); None is
  r // group_size, group_size being the input rows per group (k for one group per output column).
The dequantized weight is W[c, r] = (q[r, c] - z[g(r), c]) * s[g(r), c]. It costs k * n / 2 bytes, plus
(2 + 1) * n * k / group_size for 16-bit scales and zeros (3 % of the weight at group_size 128).

Numerics of ``w4a16_linear`` (what every provider matches up to the fp32 summation order): ``y = x @ W^T + bias``
computed in fp32 (q - z is a small integer and s a 16-bit float, so the dequantized weight is exact in fp32), rounded
once to x's dtype. A provider may run its tensor-core dot on x's dtype with the integers (q - z) exact in it and the
scale applied to each group's fp32 partial sum, which only reorders the same exact products; or, where a tile spans
several groups (act order), round the dequantized weight to x's dtype first.
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = [
    "INT4_PACK",
    "dequantize_int4",
    "group_index",
    "pack_int4_rows",
    "unpack_int4_rows",
    "w4a16_linear",
]

INT4_PACK = 8  # 4-bit values per int32 word
SYMMETRIC_ZERO = 8  # the zero point of symmetric 4-bit quantization (unsigned values 0..15 around it)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """q [k, n] (integers 0..15, k a multiple of 8) -> int32 [k / 8, n]: word [i, c] = sum_j q[8i + j, c] << 4j.
    In int32 throughout (no wider copy of a large weight): the seven low nibbles add up below 2^28, and the top one,
    read as a signed nibble, times 2^28 supplies the sign bit."""
    k, n = q.shape
    assert k % INT4_PACK == 0, f"k ({k}) must be a multiple of {INT4_PACK}"
    nibbles = q.to(torch.int32).reshape(k // INT4_PACK, INT4_PACK, n)
    words = torch.zeros(k // INT4_PACK, n, dtype=torch.int32, device=q.device)
    for j in range(INT4_PACK - 1):
        words += nibbles[:, j] << (4 * j)
    top = nibbles[:, INT4_PACK - 1]
    return words + torch.where(top >= 8, top - 16, top) * (1 << 28)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [k / 8, n] -> q [k, n] int32 in 0..15 (the inverse of :func:`pack_int4_rows`)."""
    rows, n = packed.shape
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32).view(1, INT4_PACK, 1)
    return ((packed.unsqueeze(1) >> shifts) & 0xF).reshape(rows * INT4_PACK, n)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The group of each of the k input rows: g_idx, or r // group_size (int64 [k])."""
    if g_idx is not None:
        return g_idx.to(torch.int64)
    return torch.arange(k, device=device, dtype=torch.int64) // group_size


def dequantize_int4(
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """The dequantized weight, transposed: fp32 [k, n] with [r, c] = (q[r, c] - z[g(r), c]) * s[g(r), c]."""
    q = unpack_int4_rows(packed_weight)
    groups = group_index(q.shape[0], group_size, g_idx, q.device)
    z = zeros.to(torch.int32).index_select(0, groups) if zeros is not None else SYMMETRIC_ZERO
    return (q - z).float() * scales.float().index_select(0, groups)


def _example(device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    x = torch.randn(1, 4096, device=device, dtype=dtype)  # one decode token
    # the report needs shapes only
    packed = torch.empty(4096 // INT4_PACK, 4096, device=device, dtype=torch.int32)
    scales = torch.ones(4096 // 128, 4096, device=device, dtype=dtype)
    return x, packed, scales, None, None, None, 128


@op(example=_example)
def w4a16_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` with W the 4-bit weight in the layout above: x [..., k] (float); packed_weight int32
    [k / 8, n]; scales [num_groups, n]; zeros uint8 [num_groups, n] or None (8); g_idx int32 [k] or None
    (r // group_size); bias [n] or None. Result [..., n] in x's dtype."""
    weight = dequantize_int4(packed_weight, scales, zeros, g_idx, group_size)  # [k, n] fp32
    y = torch.matmul(x.float(), weight)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
