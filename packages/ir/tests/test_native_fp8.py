"""The fp8 ops' native specs against references built differently: the e4m3 grid enumerated from its 256 codes
(nearest value, ties to the even code), and float64 matmuls of the dequantized operands."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from treadle_ir import ops
from treadle_ir.ops.fp8 import FP8_MAX

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _e4m3_grid() -> torch.Tensor:
    """Every finite float8_e4m3fn value in code order (codes 0-126 are the non-negative ones)."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return values[torch.isfinite(values)]


def _nearest_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round y (float64, |y| <= 448) to the nearest e4m3 value; a tie goes to the even code."""
    grid = _e4m3_grid()
    positive = grid[(grid >= 0) & ~torch.signbit(grid)]  # codes 0..126, ascending
    mag = y.abs().flatten()
    dist = (mag[:, None] - positive[None, :]).abs()
    best = dist.min(dim=1).values
    # candidates at the smallest distance; on a tie prefer the even code (= even mantissa)
    ties = dist == best[:, None]
    codes = torch.arange(len(positive))
    pick = torch.where(ties & (codes % 2 == 0)[None, :], 0, 1) + torch.where(ties, 0, 2)
    chosen = positive[pick.argmin(dim=1)]
    return (torch.sign(y.flatten()) * chosen).view_as(y)


def _half_ulp(v: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |v| (v in scaled units): 2^(e - 4) in the normal range, 2^-10 below 2^-6."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    return torch.exp2(e - 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (17, 100), (2, 5, 33)])
def test_quantize_rows_is_the_nearest_e4m3_at_amax_over_448(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[-1])).to(dtype)
    x.view(-1, shape[-1])[0, :3] = 0.0  # zeros stay zero
    q, scale = ops.quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    amax = x.double().abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(scale.double(), amax / FP8_MAX, rtol=2e-7, atol=0)
    # each value is the e4m3 value nearest to x * (1 / scale) (the reciprocal and the product rounded to fp32 first)
    y = (x.float() * torch.reciprocal(scale)).double()
    assert torch.equal(q.double(), _nearest_e4m3(y))
    # round trip: within half an e4m3 step of x / scale, per row's scale
    err = (q.double() * scale.double() - x.double()).abs()
    bound = _half_ulp(x.double() / scale.double()) * scale.double() * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(q.double().abs().amax()) == FP8_MAX  # every row's largest value lands on 448


def test_quantize_zero_row_has_unit_scale() -> None:
    x = torch.zeros(2, 16)
    x[1, 3] = -5.0
    q, scale = ops.quantize_fp8_rows(x)
    assert scale[0].item() == 1.0 and torch.equal(q[0].float(), torch.zeros(16))
    assert q[1, 3].float().item() == -FP8_MAX


def test_quantize_with_a_given_scale_saturates() -> None:
    """Static activations: every row is quantized with the given per-tensor scale, values beyond 448 * scale clamp
    to +-448, and the returned per-row scale is the given one (a fresh tensor, not a view of it)."""
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) * 3
    given = torch.tensor([0.004])
    q, scale = ops.quantize_fp8_rows(x, given)
    assert scale.shape == (5, 1) and bool((scale == given).all()) and scale.data_ptr() != given.data_ptr()
    expected = _nearest_e4m3((x.double() / 0.004).clamp(-FP8_MAX, FP8_MAX))
    assert torch.equal(q.double(), expected)
    assert bool((x.abs() > 448 * 0.004).any()) and float(q.double().abs().amax()) == FP8_MAX


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_fp8_linear_is_the_dequantized_matmul(dtype: torch.dtype, bias: bool, rows: int) -> None:
    n, k = 45, 70
    gen = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w_fp8 = (torch.randn(n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    got = ops.fp8_linear(x, w_fp8, w_scale, b)
    assert got.dtype == dtype and got.shape == (rows, n)
    # reference: dequantize both operands in float64 (x by its own per-row quantization), F.linear
    amax = x.double().abs().amax(dim=-1, keepdim=True)
    x_scale = amax / FP8_MAX
    x_deq = _nearest_e4m3((x.float() * torch.reciprocal(x_scale.float())).double()) * x_scale.float().double()
    w_deq = w_fp8.double() * w_scale.double()[:, None]
    ref = F.linear(x_deq, w_deq, None if b is None else b.double())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), ref, **tol)
    # static: x quantized with one given scale (saturating what exceeds 448 * scale)
    given = x.float().abs().amax().reshape(1) / FP8_MAX / 2
    got = ops.fp8_linear(x, w_fp8, w_scale, b, given)
    x_deq = _nearest_e4m3((x.double() / given.double()).clamp(-FP8_MAX, FP8_MAX)) * given.double()
    ref = F.linear(x_deq, w_deq, None if b is None else b.double())
    torch.testing.assert_close(got.double(), ref, **tol)


def test_fp8_custom_ops_exist() -> None:
    x = torch.randn(3, 32)
    q, s = torch.ops.treadle_ir.quantize_fp8_rows(x)
    q2, s2 = ops.quantize_fp8_rows(x)
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)
    w = torch.randn(8, 32).to(torch.float8_e4m3fn)
    ws = torch.ones(8)
    torch.testing.assert_close(
        torch.ops.treadle_ir.fp8_linear(x, w, ws, None), ops.fp8_linear(x, w, ws, None)
    )
