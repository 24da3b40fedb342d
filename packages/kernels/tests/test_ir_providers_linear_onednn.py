"""The ``onednn`` CPU provider of the linear IR ops (linear_onednn.py) against their native specs, on fresh random
inputs: ragged row counts (none, one, a few, many), leading dims, strided rows, bias or none, float32 and bfloat16;
a weight changed in place is packed again; what it cannot serve falls back to native; on CPU it is the default."""

from __future__ import annotations

import pytest
import torch

import treadle_kernels  # noqa: F401  (registers the providers)
from treadle_ir import ops
from treadle_ir.platforms import Platform
from treadle_kernels.ops import linear_onednn as provider

pytestmark = pytest.mark.skipif(
    provider.supported(Platform(kind="cpu")) is not True,
    reason="this torch build has no packed oneDNN matmul",
)
OPS = ["linear", "add_rms_norm_linear", "silu_and_mul_linear", "gelu_tanh_and_mul_linear"]


def _args(
    name: str, rows: tuple[int, ...], n: int, k: int, dtype: torch.dtype, bias: bool, seed: int
) -> tuple:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    weight, b = randn(n, k) * k**-0.5, (randn(n) if bias else None)
    if name == "linear":
        x = randn(*rows, 2 * k)[..., ::2] if rows and rows[0] > 2 else randn(*rows, k)  # strided rows too
        return x, weight, b
    if name == "add_rms_norm_linear":
        return randn(*rows, k), randn(*rows, k), (1 + 0.1 * randn(k)), 1e-6, weight, b
    return randn(*rows, 2 * k) * 2, weight, b


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:  # the same products summed in another order
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    else:  # one bf16 rounding of the output apart at most
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(0,), (1,), (7,), (64,), (3, 5)])
def test_matches_native(name: str, dtype: torch.dtype, rows: tuple[int, ...]) -> None:
    ir_op = getattr(ops, name)
    for seed, (n, k, bias) in enumerate([(96, 40, False), (33, 64, True)]):
        args = _args(name, rows, n, k, dtype, bias, seed + 10 * len(rows) + rows[0])
        assert ir_op.providers[provider.PROVIDER].args_reason(*args) is None
        got = ir_op.providers[provider.PROVIDER].impl(*args)
        expected = ir_op.native(*args)
        for g, e in zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]:
            assert g.shape == e.shape and g.dtype == e.dtype
            _close(g, e, dtype)


def test_a_weight_changed_in_place_is_packed_again() -> None:
    x, weight, _ = _args("linear", (4,), 24, 16, torch.float32, False, 0)
    first = provider.linear(x, weight, None)
    packed = provider.packed_weight(weight)
    assert provider.packed_weight(weight) is packed  # kept while the weight is unchanged
    with torch.no_grad():
        weight.mul_(-2.0)
    _close(provider.linear(x, weight, None), first * -2.0, torch.float32)
    assert provider.packed_weight(weight) is not packed


def test_what_it_cannot_serve_falls_back_to_native() -> None:
    x, weight, _ = _args("linear", (4,), 24, 16, torch.float32, False, 0)
    check = ops.linear.providers[provider.PROVIDER].args_reason
    assert "float16" in str(check(x.half(), weight.half(), None))
    assert "dtype differs" in str(check(x, weight.bfloat16(), None))
    assert "contiguous" in str(check(x, weight.t().contiguous().t(), None))
    weight.requires_grad_(True)
    assert "autograd" in str(check(x, weight, None))
    with torch.no_grad():
        assert check(x, weight, None) is None
    assert "CPU only" in str(provider.supported(Platform(kind="cuda", capability=(9, 0))))


def test_other_cpus_keep_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured on x86-64 only: elsewhere (an Arm laptop) the linear ops stay native."""
    monkeypatch.setattr(provider._py_platform, "machine", lambda: "arm64")
    assert "x86-64 only" in str(provider.supported(Platform(kind="cpu")))


def test_default_on_cpu() -> None:
    x, weight, _ = _args("linear", (4,), 24, 16, torch.float32, False, 0)
    chosen, _ = ops.linear.explain(x, weight, None)
    assert chosen.name == (provider.PROVIDER if not torch.cuda.is_available() else "triton")
    _close(ops.linear(x, weight, None), ops.linear.native(x, weight, None), torch.float32)


def test_packing_stops_at_its_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = provider._Budget()
    budget.limit = 24 * 16 * 4 + 100  # room for one [24, 16] float32 weight
    monkeypatch.setattr(provider, "_budget", budget)
    x, first, _ = _args("linear", (4,), 24, 16, torch.float32, False, 1)
    _, second, _ = _args("linear", (4,), 24, 16, torch.float32, False, 2)
    assert provider.packed_weight(first) is not None and provider.packed_weight(second) is None
    assert torch.equal(
        provider.linear(x, second, None), ops.linear.native(x, second, None)
    )  # F.linear itself
    with torch.no_grad():
        first.add_(1.0)  # a repack of a packed weight stays within what it already holds
    assert provider.packed_weight(first) is not None and budget.used == 24 * 16 * 4
    _close(provider.linear(x, first, None), ops.linear.native(x, first, None), torch.float32)
