"""The Triton providers of the fused linear ops against their native specs, on fresh random inputs.

CPU: Triton's interpreter at tiny, deliberately ragged sizes (outputs not a multiple of BLOCK_N, inputs not a
multiple of BLOCK_K, strided input rows, leading dims); GPU (``-m gpu``): the projections of Llama-3.1-8B and
SmolLM2 at the row counts a decode step uses. Rows beyond ``MAX_ROWS`` take the unfused path and must match too.
The kernel tests force the kernel for every prologue and row count (`kernel_everywhere`); by default the provider
picks it only where it measured faster (`test_default_policy`).
"""

from __future__ import annotations

import pytest
import torch
from test_ir_providers import CUDA, DEVICE, DTYPES, _check, _gen, _randn, _triton, gpu, needs_cuda

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import ops
from treadle_kernels.ops import linear as provider
from treadle_kernels.ops.linear import MAX_ROWS, Config

pytest.importorskip("triton")


@pytest.fixture(autouse=True, params=["tiles", "stream"])
def kernel_everywhere(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Run the fused kernel wherever it may run (up to MAX_ROWS rows), not only where it is the default; one row
    with one program per tile (`tiles`) or with the persistent stream kernel (`stream`: on CPU small k tiles and
    4 programs, so each program walks several output tiles and k tiles; on GPU the production tiles)."""
    stream = Config(1, 4, 2048, 4, 3, 2) if CUDA else Config(1, 4, 64, 4, 3, 1)

    def config(prologue: int, num_rows: int, n: int, k: int) -> Config | None:
        if num_rows > MAX_ROWS:
            return None
        if num_rows == 1:
            return stream if request.param == "stream" else Config(1, 16, 512, 4, 3)
        return Config(16, 16, 256, 4, 3)

    monkeypatch.setattr(provider, "_config", config)


def _inputs(rows: tuple[int, ...], n: int, k: int, dtype: torch.dtype, bias: bool, seed: int) -> dict:
    gen = _gen(seed)
    weight = (_randn(gen, n, k, dtype=torch.float32) * k**-0.5).to(dtype)
    return {
        "x": _randn(gen, *rows, k, dtype=dtype),
        "residual": _randn(gen, *rows, k, dtype=dtype),
        "norm_weight": (1 + 0.1 * _randn(gen, k, dtype=torch.float32)).to(dtype),
        "gated": _randn(gen, *rows, 2 * k, dtype=dtype) * 2,
        "weight": weight,
        "bias": _randn(gen, n, dtype=dtype) if bias else None,
    }


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """`_check`'s bounds; under the interpreter bf16 relative error up to 2e-2: it truncates each of the two or
    three roundings the prologue makes (sum, norm, activation), and the matmul adds them up (elementwise: 3 % of
    the largest output, since single outputs near zero carry the sum of their inputs' truncations)."""
    if dtype == torch.float32 and CUDA:  # fp32 sums of up to 14336 products in another order than cuBLAS's
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    elif dtype == torch.bfloat16 and not CUDA:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(got, expected, atol=0.03 * scale, rtol=2.5e-2)
        err = (got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
        assert err.item() <= 2e-2, f"bf16 relative error {err.item():.3g} > 2e-2 under the interpreter"
    else:
        _check(got, expected, dtype)


def _check_all(rows: tuple[int, ...], n: int, k: int, dtype: torch.dtype, bias: bool, seed: int) -> None:
    t = _inputs(rows, n, k, dtype, bias, seed)
    w, b = t["weight"], t["bias"]
    cases = [
        (ops.linear, (t["x"], w, b)),
        (ops.add_rms_norm_linear, (t["x"], t["residual"], t["norm_weight"], 1e-6, w, b)),
        (ops.silu_and_mul_linear, (t["gated"], w, b)),
        (ops.gelu_tanh_and_mul_linear, (t["gated"], w, b)),
    ]
    for ir_op, args in cases:
        expected = ir_op.native(*args)
        with _triton(ir_op, *args):
            got = ir_op(*args)
        if ir_op is ops.add_rms_norm_linear:
            assert got[0].shape == (*rows, n) and got[1].shape == (*rows, k)
            _close(got[0], expected[0], dtype)
            _close(got[1], expected[1], dtype)  # x + residual, stored once by program 0
        else:
            assert got.shape == (*rows, n), ir_op.name
            _close(got, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [(1,), (3,), (MAX_ROWS,), (2, 2), (MAX_ROWS + 1,)])
def test_fused_linears(rows: tuple[int, ...], dtype: torch.dtype) -> None:
    _check_all(rows, n=40, k=80, dtype=dtype, bias=False, seed=sum(rows))


@pytest.mark.parametrize("rows", [(1,), (5,)])
def test_fused_linears_ragged_with_bias(rows: tuple[int, ...]) -> None:
    """n = 33 leaves a partial BLOCK_N tile, k = 1100 a partial BLOCK_K tile; bias added in fp32."""
    _check_all(rows, n=33, k=1100, dtype=torch.bfloat16, bias=True, seed=7)


def test_linear_on_strided_rows() -> None:
    """x as a column slice of a wider buffer (rows strided), as attention output views can be."""
    gen = _gen(9)
    wide = _randn(gen, 3, 100, dtype=torch.float32)
    x, weight = wide[:, :64], _randn(gen, 24, 64, dtype=torch.float32)
    with _triton(ops.linear, x, weight, None):
        got = ops.linear(x, weight, None)
    _check(got, ops.linear.native(x, weight, None), torch.float32)


def test_triton_declines_what_it_cannot_read() -> None:
    x = torch.randn(2, 64, device=DEVICE)
    for weight, why in (
        (torch.randn(64, 24, device=DEVICE).t(), "strided"),
        (torch.randn(24, 32, device=DEVICE), "contiguous"),
        (torch.randn(24, 64, device=DEVICE, dtype=torch.float16), "dtype"),
    ):
        with ops.linear.priority(["triton"]):
            chosen, skipped = ops.linear.explain(x, weight, None)
        assert chosen.name == "native" and why in skipped["triton"], skipped
    with ops.silu_and_mul_linear.priority(["triton"]):
        chosen, skipped = ops.silu_and_mul_linear.explain(torch.randn(2, 65, device=DEVICE), x, None)
    assert chosen.name == "native" and "even" in skipped["triton"]


def test_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where allowed (one row by default), the kernel where the H200 sweep measured it faster: every prologue at
    one row (the stream kernel below the lm_head's size only when asked), only the plain projection at 2-16 rows."""
    monkeypatch.undo()
    provider._max_rows.cache_clear()
    try:
        monkeypatch.delenv("TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS", raising=False)  # default: one row
        assert provider._config(provider._NORM, 1, 4096, 4096).programs_per_sm == 0  # type: ignore[union-attr]
        monkeypatch.setenv("TREADLE_STREAM_LINEAR", "1")
        assert provider._config(provider._NORM, 1, 4096, 4096).programs_per_sm > 0  # type: ignore[union-attr]
        assert provider._config(provider._PLAIN, 1, 128256, 4096).programs_per_sm == 0  # type: ignore[union-attr]
        monkeypatch.delenv("TREADLE_STREAM_LINEAR")
        assert provider._config(provider._PLAIN, 2, 4096, 4096) is None
        provider._max_rows.cache_clear()
        monkeypatch.setenv("TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS", "0")
        assert provider._config(provider._PLAIN, 1, 4096, 4096) is None
        provider._max_rows.cache_clear()
        monkeypatch.setenv("TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS", str(MAX_ROWS))
        for prologue in (provider._PLAIN, provider._NORM, provider._SILU, provider._GELU_TANH):
            assert provider._config(prologue, 1, 4096, 4096) is not None
            assert (provider._config(prologue, 4, 4096, 4096) is not None) == (prologue == provider._PLAIN)
            assert provider._config(prologue, MAX_ROWS + 1, 4096, 4096) is None
        provider._max_rows.cache_clear()
        monkeypatch.setenv("TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS", "99")
        with pytest.raises(ValueError, match="from 0 to 16"):
            provider._config(provider._PLAIN, 1, 4096, 4096)
    finally:
        provider._max_rows.cache_clear()


LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down
SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, MAX_ROWS, 64])
@pytest.mark.parametrize("shape", LLAMA_8B + SMOLLM2)
def test_fused_linears_gpu(shape: tuple[int, int], rows: int, dtype: torch.dtype) -> None:
    assert CUDA
    n, k = shape
    _check_all((rows,), n, k, dtype, bias=n == 960, seed=n + k + rows)
