"""The fp8 providers (ops/fp8_linear.py) against the IR specs (treadle_ir.ops.fp8) on fresh random inputs.

CPU: Triton's interpreter runs the row quantization kernel and the weight-streaming kernel at small, ragged sizes
(n and k not multiples of 16 or of the tiles), with and without bias, at 1, 3 and 16 rows; past 16 rows the
provider quantizes and calls ``torch._scaled_mm``, whose wrapper (`scaled_mm_linear`) runs here on CPU where this
torch has a CPU row-wise ``_scaled_mm``. GPU (``-m gpu``): Llama-3.1-8B's projections at 1 to 4096 rows, i.e. both
the Triton kernel and ``torch._scaled_mm``.
The quantization must equal the spec bit for bit (same IEEE division, same rounding); the linear may differ only
by its fp32 summation order, i.e. by one rounding of the output (under the interpreter, which truncates to bf16,
one bf16 step). Static activation quantization (a given per-tensor ``input_scale``, chosen small enough that the
outlier row saturates at 448) goes through the same checks: the quantization kernel, both linear paths.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_ir_providers import CUDA, DEVICE, _gen, _randn, _triton, gpu, needs_cuda

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import ops
from treadle_kernels.ops import fp8_linear as provider

pytest.importorskip("triton")


def _inputs(
    rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int, static: bool = False
) -> tuple:
    """(x, weight, weight_scale, bias) and, when `static`, a given input scale [1] under which row 0 saturates."""
    gen = _gen(seed)
    x = _randn(gen, rows, k, dtype=dtype)
    x[0, : min(k, 3)] *= 40.0  # an outlier column block: per-row scales must follow it
    weight = _randn(gen, n, k, dtype=torch.float32) * k**-0.5
    w_fp8, w_scale = ops.quantize_fp8_rows.native(weight)
    b = _randn(gen, n, dtype=dtype) if bias else None
    args = (x, w_fp8, w_scale.view(n), b)
    return (*args, _static_scale(x)) if static else args


def _static_scale(x: torch.Tensor) -> torch.Tensor:
    """A per-tensor input scale a calibration might give: a quarter of the largest row's amax / 448 (so the
    outlier row saturates while the others use the range)."""
    return (x.float().abs().amax() / 448 / 4).reshape(1)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """One rounding of the output apart: 2^-7 relative for bf16 (the interpreter truncates: one full step),
    fp32 summation order for fp32."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = expected.float().abs().max().item()
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=2**-8 * scale)
        err = (got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
        bound = 2e-3 if CUDA else 2**-7  # the interpreter truncates every output: half a step on average
        assert err.item() <= bound, f"relative error {err.item():.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 100), (3, 37), (17, 64), (5, 2000), (2, 3, 50)])
def test_quantize_rows_equals_spec(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = _gen(sum(shape))
    x = _randn(gen, *shape, dtype=torch.float32) * torch.logspace(-4, 3, shape[-1], device=DEVICE)
    x = x.to(dtype)
    static = _static_scale(x)
    x.view(-1, shape[-1])[-1] = 0.0  # a zero row: scale 1 (dynamic)
    for given in (None, static):
        expected = ops.quantize_fp8_rows.native(x, given)
        with _triton(ops.quantize_fp8_rows, x, given):
            q, scale = ops.quantize_fp8_rows(x, given)
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (*shape[:-1], 1)
        assert torch.equal(scale, expected[1])
        assert torch.equal(q.view(torch.uint8), expected[0].view(torch.uint8))
    if x.any():
        assert float(q.float().abs().amax()) == 448.0  # the static scale saturates the largest values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(45, 70), (33, 130), (8, 2048)])
def test_small_m_kernel_matches_spec(
    shape: tuple[int, int], rows: int, bias: bool, dtype: torch.dtype, kernel_rows: None
) -> None:
    n, k = shape
    args = _inputs(rows, n, k, dtype, bias, seed=n + k + rows)
    expected = ops.fp8_linear.native(*args)
    with _triton(ops.fp8_linear, *args):
        got = ops.fp8_linear(*args)
    _close(got, expected)


@pytest.fixture
def kernel_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernel for every row count it takes (by default it runs one row only)."""
    monkeypatch.setenv("TREADLE_FP8_LINEAR_MAX_ROWS", str(provider.MAX_ROWS))
    provider._max_rows.cache_clear()
    yield
    monkeypatch.delenv("TREADLE_FP8_LINEAR_MAX_ROWS")
    provider._max_rows.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(45, 70), (8, 2048)])
def test_small_m_kernel_static_input_scale(
    shape: tuple[int, int], rows: int, dtype: torch.dtype, kernel_rows: None
) -> None:
    n, k = shape
    args = _inputs(rows, n, k, dtype, bias=True, seed=n + rows, static=True)
    expected = ops.fp8_linear.native(*args)
    with _triton(ops.fp8_linear, *args):
        got = ops.fp8_linear(*args)
    _close(got, expected)
    dynamic = ops.fp8_linear.native(*args[:4])
    assert not torch.allclose(expected[0].float(), dynamic[0].float(), rtol=1e-2), "given scale unused"


def test_leading_dims_and_strided_rows(kernel_rows: None) -> None:
    """x as [2, 3, k] and as a column slice of a wider buffer (rows strided)."""
    n, k = 24, 40
    x, w, s, b = _inputs(6, n, k, torch.float32, True, seed=5)
    x3 = x.view(2, 3, k)
    with _triton(ops.fp8_linear, x3, w, s, b):
        got = ops.fp8_linear(x3, w, s, b)
    _close(got, ops.fp8_linear.native(x3, w, s, b))
    wide = _randn(_gen(6), 3, 100, dtype=torch.float32)
    xs = wide[:, :k]
    with _triton(ops.fp8_linear, xs, w, s, None):
        got = ops.fp8_linear(xs, w, s, None)
    _close(got, ops.fp8_linear.native(xs, w, s, None))


def _cpu_scaled_mm() -> bool:
    try:
        q = torch.ones(16, 16, dtype=torch.float8_e4m3fn)
        torch._scaled_mm(
            q, q.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(CUDA, reason="the CPU check of the wrapper; GPU sizes below")
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [17, 128])
def test_scaled_mm_wrapper_matches_spec(rows: int, bias: bool, static: bool) -> None:
    """The large-M path's pieces on CPU: the quantization kernel (interpreter), then `scaled_mm_linear`."""
    if not _cpu_scaled_mm():
        pytest.skip("this torch has no CPU row-wise torch._scaled_mm")
    n, k = 48, 80
    x, w, s, b, *given = _inputs(rows, n, k, torch.bfloat16, bias, seed=rows, static=static)
    input_scale = given[0] if given else None
    with _triton(ops.quantize_fp8_rows, x, input_scale):
        q, scale = ops.quantize_fp8_rows(x, input_scale)
    got = provider.scaled_mm_linear(q, scale, w, s, b)
    _close(got, ops.fp8_linear.native(x, w, s, b, input_scale))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rows", [17, 128])
def test_past_the_kernel_rows_still_matches(rows: int, static: bool) -> None:
    """Beyond 16 rows on CPU (no _scaled_mm provider path here) the provider runs the spec: same result."""
    args = _inputs(rows, 33, 70, torch.bfloat16, True, seed=rows + 1, static=static)
    with _triton(ops.fp8_linear, *args):
        got = ops.fp8_linear(*args)
    _close(got, ops.fp8_linear.native(*args))


def test_declines_what_it_cannot_read() -> None:
    x = torch.randn(2, 64, device=DEVICE)
    w = torch.randn(24, 64, device=DEVICE).to(torch.float8_e4m3fn)
    s = torch.ones(24, device=DEVICE)
    for args, why in (
        ((x, torch.randn(24, 64, device=DEVICE), s, None), "dtype"),
        ((x, w, s.double(), None), "weight_scale dtype"),
        ((x, w, torch.ones(24, 1, device=DEVICE), None), "one per output channel"),
        ((x, w.t().contiguous().t(), s, None), "strided"),
        ((x, w, s, None, torch.ones(2, device=DEVICE)), "one per tensor"),
        ((x, w, s, None, torch.ones(1, device=DEVICE, dtype=torch.float64)), "input_scale dtype"),
    ):
        with ops.fp8_linear.priority(["triton"]):
            chosen, skipped = ops.fp8_linear.explain(*args)
        assert chosen.name == "native" and why in skipped["triton"], skipped


def test_row_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    provider._max_rows.cache_clear()
    try:
        assert provider._max_rows() == provider.DEFAULT_ROWS
        monkeypatch.setenv("TREADLE_FP8_LINEAR_MAX_ROWS", "0")
        provider._max_rows.cache_clear()
        assert provider._max_rows() == 0
        monkeypatch.setenv("TREADLE_FP8_LINEAR_MAX_ROWS", "17")
        provider._max_rows.cache_clear()
        with pytest.raises(ValueError, match="from 0 to 16"):
            provider._max_rows()
    finally:
        monkeypatch.delenv("TREADLE_FP8_LINEAR_MAX_ROWS", raising=False)
        provider._max_rows.cache_clear()


LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (n, k): qkv, o, gate_up, down


@gpu
@needs_cuda
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rows", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("shape", LLAMA_8B)
def test_fp8_linear_gpu(shape: tuple[int, int], rows: int, static: bool) -> None:
    """bf16, Llama-3.1-8B's projections: the Triton kernel up to 16 rows, quantization + torch._scaled_mm beyond
    (the provider must take that path on an H100/H200: asserted), against the spec computed in fp32; dynamic and
    static (given per-tensor input scale) activation quantization."""
    n, k = shape
    x, w, s, b, *given = _inputs(rows, n, k, torch.bfloat16, bias=n == 6144, seed=n + k + rows, static=static)
    input_scale = given[0] if given else None
    if rows > provider._max_rows():
        assert provider._scaled_mm_reason(x, w) is None, provider._scaled_mm_reason(x, w)
    expected = ops.fp8_linear.native(x, w, s, b, input_scale)
    with _triton(ops.fp8_linear, x, w, s, b, input_scale):
        got = ops.fp8_linear(x, w, s, b, input_scale)
    _close(got, expected)
    with _triton(ops.quantize_fp8_rows, x, input_scale):
        q, scale = ops.quantize_fp8_rows(x, input_scale)
    # the spec on the CPU: IEEE division and a round-to-nearest-even cast, whatever torch's CUDA kernels do
    q_ref, scale_ref = ops.quantize_fp8_rows.native(
        x.cpu(), None if input_scale is None else input_scale.cpu()
    )
    assert torch.equal(scale.cpu(), scale_ref) and torch.equal(
        q.cpu().view(torch.uint8), q_ref.view(torch.uint8)
    )
