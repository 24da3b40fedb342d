"""Provider registration, priority sources, batch-invariant filtering, the report, and eager overhead."""

from __future__ import annotations

import time

import pytest
import torch

import treadle_ir
from treadle_ir import IrConfig, IrOp, Platform, ops


def _double(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * (2 * factor)


def _triple(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * (3 * factor)


def test_signature_mismatch_is_rejected_naming_the_difference(scale_op: IrOp) -> None:
    def wrong_name(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x

    def missing(x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_default(x: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        return x

    with pytest.raises(TypeError, match=r"parameter #1 is scale .* expected factor"):
        scale_op.register_impl("bad")(wrong_name)
    with pytest.raises(TypeError, match=r"missing parameter #1 factor"):
        scale_op.register_impl("bad")(missing)
    with pytest.raises(TypeError, match=r"= 1.0"):
        scale_op.register_impl("bad")(extra_default)
    with pytest.raises(ValueError, match="reserved"):
        scale_op.register_impl("native")(_double)
    assert list(scale_op.providers) == ["native"]


def test_keyword_only_parameters_are_rejected() -> None:
    def kwonly(x: torch.Tensor, *, factor: float) -> torch.Tensor:
        return x

    with pytest.raises(ValueError, match="keyword-only"):
        treadle_ir.op(name="test_kwonly")(kwonly)


def test_platform_default_then_overrides(scale_op: IrOp, monkeypatch: pytest.MonkeyPatch) -> None:
    scale_op.register_impl("fast")(_double)
    scale_op.register_impl("other")(_triple)
    x = torch.ones(3)
    # cpu default priority is native only: registered providers are not used, with a reason
    assert scale_op.select(x, 1.0).name == "native"
    assert "not in the priority list" in scale_op.resolve().skipped["fast"]
    assert torch.equal(scale_op(x, 1.0), x)
    # cuda default puts triton first: 'fast' is still not listed, native wins
    assert scale_op.resolve(Platform(kind="cuda", capability=(9, 0))).priority == ("triton", "native")

    monkeypatch.setenv("TREADLE_IR_OP_PRIORITY", "test_scale=fast,native")
    assert torch.equal(scale_op(x, 1.0), x), "env is read at resolution time, not per call"
    treadle_ir.refresh()
    assert torch.equal(scale_op(x, 1.0), 2 * x)
    assert scale_op.resolve().source == "TREADLE_IR_OP_PRIORITY"
    treadle_ir.set_config(IrConfig(op_priority={"test_scale": ["other"]}))  # config beats env
    assert torch.equal(scale_op(x, 1.0), 3 * x)
    assert scale_op.resolve().priority == ("other", "native")
    with scale_op.priority(["fast"]):  # context manager beats config
        assert torch.equal(scale_op(x, 1.0), 2 * x)
        with scale_op.priority(["native"]):
            assert torch.equal(scale_op(x, 1.0), x)
    assert torch.equal(scale_op(x, 1.0), 3 * x)
    with treadle_ir.use_config(IrConfig.from_cli("test_scale=native")):
        assert torch.equal(scale_op(x, factor=1.0), x)
    assert torch.equal(scale_op(x, 1.0), 3 * x)


def test_unsupported_providers_are_dropped_with_reasons(scale_op: IrOp) -> None:
    def raises(platform: Platform) -> bool:
        raise RuntimeError("driver missing")

    scale_op.register_impl("gpu_only", supported=lambda p: p.is_cuda or "needs CUDA")(_triple)
    scale_op.register_impl("broken", supported=raises)(_triple)
    scale_op.register_impl("f32_only", supports_args=lambda x, f: x.dtype == torch.float32 or "fp32 only")(
        _double
    )
    with scale_op.priority(["missing", "gpu_only", "broken", "f32_only"]):
        resolution = scale_op.resolve()
        assert [p.name for p in resolution.candidates] == ["f32_only", "native"]
        assert resolution.skipped["gpu_only"] == "needs CUDA"
        assert "RuntimeError: driver missing" in resolution.skipped["broken"]
        assert "no provider 'missing' registered" in resolution.skipped["missing"]
        x = torch.ones(2)
        assert torch.equal(scale_op(x, 1.0), 2 * x)
        half = x.half()
        assert torch.equal(scale_op(half, 1.0), half)  # supports_args rejects -> falls through to native
        chosen, skipped = scale_op.explain(half, 1.0)
        assert chosen.name == "native" and skipped["f32_only"] == "fp32 only"
        assert scale_op.resolve(Platform(kind="cuda")).candidates[0].name == "gpu_only"


def test_batch_invariant_mode_keeps_only_invariant_providers(
    scale_op: IrOp, monkeypatch: pytest.MonkeyPatch
) -> None:
    scale_op.register_impl("variant")(_double)
    scale_op.register_impl("invariant", batch_invariant=True)(_triple)
    x = torch.ones(2)
    with scale_op.priority(["variant", "invariant"]):
        assert torch.equal(scale_op(x, 1.0), 2 * x)
        monkeypatch.setenv("TREADLE_BATCH_INVARIANT", "1")
        treadle_ir.refresh()  # env changes are picked up at the next resolution
        assert torch.equal(scale_op(x, 1.0), 3 * x)
        assert "not batch-invariant" in scale_op.resolve().skipped["variant"]
        monkeypatch.setenv("TREADLE_BATCH_INVARIANT", "maybe")
        with pytest.raises(ValueError, match="TREADLE_BATCH_INVARIANT='maybe'"):
            scale_op.resolve()
        monkeypatch.delenv("TREADLE_BATCH_INVARIANT")
        with treadle_ir.use_config(IrConfig(batch_invariant=True)):
            assert torch.equal(scale_op(x, 1.0), 3 * x)


def test_bad_priority_settings_raise_naming_their_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"unknown IR op.*'no_such_op'.*rms_norm"):
        treadle_ir.set_config(IrConfig(op_priority={"no_such_op": ["native"]}))
    with pytest.raises(ValueError, match="is a string"):
        IrConfig(op_priority={"rms_norm": "triton"})
    with pytest.raises(ValueError, match="--ir-op-priority: cannot parse 'rms_norm'"):
        IrConfig.from_cli("rms_norm")
    monkeypatch.setenv("TREADLE_IR_OP_PRIORITY", "rms_norm=triton;bogus=native")
    with pytest.raises(ValueError, match="TREADLE_IR_OP_PRIORITY names unknown IR op"):
        ops.rms_norm.resolve()
    assert treadle_ir.parse_op_priority("rms_norm=triton, native ; silu_and_mul=native") == {
        "rms_norm": ("triton", "native"),
        "silu_and_mul": ("native",),
    }


def test_report_lists_every_op_with_selection_and_reasons(scale_op: IrOp) -> None:
    scale_op.register_impl("gpu_only", supported=lambda p: p.is_cuda or "needs CUDA")(_triple)
    text = treadle_ir.report()
    for (
        name
    ) in ops.__all__:  # installed plugins may serve some (treadle-kernels' onednn and cpu providers on CPU)
        assert f"\n{name}: selected " in text
    assert f"\n{scale_op.name}: selected native" in text
    assert "gpu_only: skipped: not in the priority list ['onednn', 'cpu', 'native']" in text  # CPU's default
    with scale_op.priority(["gpu_only"]):
        assert "gpu_only: skipped: needs CUDA" in treadle_ir.report()


def test_eager_dispatch_overhead_is_small(scale_op: IrOp) -> None:
    """Per-call dispatch cost, measured against calling the selected impl directly (best of several runs)."""

    def noop(x: torch.Tensor, factor: float) -> torch.Tensor:
        return x

    scale_op.register_impl("noop", supports_args=lambda x, factor: x.dim() == 1)(noop)
    x, calls = torch.ones(2), 20000

    def per_call_us(fn: object) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn(x, 1.0)  # type: ignore[operator]
        return (time.perf_counter() - start) / calls * 1e6

    with scale_op.priority(["noop"]):
        scale_op(x, 1.0)
        rounds = [(per_call_us(scale_op), per_call_us(noop)) for _ in range(7)]  # interleaved vs. noise
    overhead = min(r[0] for r in rounds) - min(r[1] for r in rounds)
    # typically ~1 us (a CUDA kernel launch alone is ~5 us); the bound is loose for a shared 2-core machine
    assert overhead < 10.0, f"eager IR dispatch overhead {overhead:.2f} us per call"
