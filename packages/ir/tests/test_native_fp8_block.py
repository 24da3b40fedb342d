"""The block-wise fp8 ops' native specs against references built differently: groups cut with Python slices one at
a time, values rounded to the nearest e4m3 code found by enumerating the grid (test_native_fp8.py), and float64
matmuls of operands dequantized element by element."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_native_fp8 import _nearest_e4m3

from treadle_ir import ops
from treadle_ir.ops.fp8 import FP8_MAX
from treadle_ir.ops.fp8_block import dequantize_blocks, quantize_fp8_blocks

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _groups_reference(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values as float64 [rows, k], scales [rows, groups]) of x [rows, k], one group at a time."""
    rows, k = x.shape
    q = torch.zeros(rows, k, dtype=torch.float64)
    scales = torch.zeros(rows, -(-k // group), dtype=torch.float64)
    for r in range(rows):
        for g, start in enumerate(range(0, k, group)):
            part = x[r, start : start + group].float()
            amax = float(part.abs().max())
            scale = torch.tensor(amax / FP8_MAX if amax > 0 else 1.0, dtype=torch.float32)
            scales[r, g] = float(scale)
            q[r, start : start + group] = _nearest_e4m3((part * torch.reciprocal(scale)).double())
    return q, scales


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "group"), [((1, 7), 16), ((3, 64), 16), ((5, 100), 32), ((2, 3, 33), 8)])
def test_quantize_groups_is_each_groups_own_quantization(
    dtype: torch.dtype, shape: tuple[int, ...], group: int
) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + group)
    x = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[-1])).to(dtype)
    x.view(-1, shape[-1])[0, :group] = 0.0  # an all-zero group: scale 1, values 0
    q, scale = ops.quantize_fp8_groups(x, group)
    groups = -(-shape[-1] // group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], groups)
    q_ref, scale_ref = _groups_reference(x.reshape(-1, shape[-1]), group)
    assert torch.equal(q.reshape(-1, shape[-1]).double(), q_ref)
    assert torch.equal(scale.reshape(-1, groups).double(), scale_ref)
    assert float(scale.reshape(-1, groups)[0, 0]) == 1.0


def test_quantize_blocks_gives_each_tile_its_own_scale() -> None:
    """Ragged tiles (n, k not multiples of the block): each tile's values are its nearest e4m3 at amax / 448."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(45, 70, generator=gen) * torch.logspace(-2, 1, 70)
    q, scale = quantize_fp8_blocks(w, 16, 32)
    assert q.shape == (45, 70) and scale.shape == (3, 3)
    for i, r0 in enumerate(range(0, 45, 16)):
        for j, c0 in enumerate(range(0, 70, 32)):
            tile = w[r0 : r0 + 16, c0 : c0 + 32]
            s = torch.tensor(float(tile.abs().max()) / FP8_MAX, dtype=torch.float32)
            assert float(scale[i, j]) == float(s)
            expected = _nearest_e4m3((tile * torch.reciprocal(s)).double())
            assert torch.equal(q[r0 : r0 + 16, c0 : c0 + 32].double(), expected)
    deq = dequantize_blocks(q, scale, 16, 32)
    assert float(deq[44, 69]) == float(q[44, 69].float() * scale[2, 2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("rows", "n", "k", "block"), [(1, 45, 70, (16, 32)), (3, 64, 64, (32, 16)),
                                                       (17, 33, 100, (8, 64))])  # fmt: skip
def test_block_linear_is_the_dequantized_matmul(
    dtype: torch.dtype, bias: bool, rows: int, n: int, k: int, block: tuple[int, int]
) -> None:
    gen = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w_fp8 = (torch.randn(n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    bn, bk = block
    w_scale = torch.rand(-(-n // bn), -(-k // bk), generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    got = ops.fp8_block_linear(x, w_fp8, w_scale, b, bn, bk)
    assert got.dtype == dtype and got.shape == (rows, n)
    q_ref, x_scale = _groups_reference(x, bk)
    x_deq = q_ref * torch.cat(
        [x_scale[:, g : g + 1].expand(-1, min(bk, k - g * bk)) for g in range(x_scale.shape[1])], 1
    )
    w_deq = torch.empty(n, k, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            w_deq[i, j] = float(w_fp8[i, j].float()) * float(w_scale[i // bn, j // bk])
    ref = F.linear(x_deq, w_deq, None if b is None else b.double())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), ref, **tol)


def test_block_linear_leading_dims_and_custom_ops() -> None:
    x = torch.randn(2, 3, 40)
    w, s = quantize_fp8_blocks(torch.randn(24, 40), 16, 16)
    y = ops.fp8_block_linear(x, w, s, None, 16, 16)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.view(6, 24), ops.fp8_block_linear(x.view(6, 40), w, s, None, 16, 16))
    torch.testing.assert_close(torch.ops.treadle_ir.fp8_block_linear(x, w, s, None, 16, 16), y)
    q, g = torch.ops.treadle_ir.quantize_fp8_groups(x, 16)
    q2, g2 = ops.quantize_fp8_groups(x, 16)
    assert torch.equal(q.float(), q2.float()) and torch.equal(g, g2) and g.shape == (2, 3, 3)
