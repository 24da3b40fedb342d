"""torch.compile lowering: IR nodes are opaque to Dynamo, then replaced by the provider dispatch picks.

aot_eager runs the lowered graph without code generation (so outputs must be bitwise identical to eager);
one small Inductor test checks the native lowering compiles and fuses (identical up to fp32 reassociation of
the mean, which Inductor computes in a different order than eager torch).
"""

from __future__ import annotations

import pytest
import torch

from treadle_ir import IrOp, lowering, op, ops


def _model(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    h = ops.rms_norm(x, weight, 1e-6)
    g = ops.silu_and_mul(torch.cat((h, 2 * h), dim=-1))
    ops.fused_add_rms_norm_(g, residual, weight, 1e-6)
    return g + 1, residual


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)


def test_dynamo_sees_opaque_ir_nodes() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_model, backend=capture, fullgraph=True)(*_inputs())
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert ops.rms_norm.torch_op in targets and ops.fused_add_rms_norm_.torch_op in targets


def test_lowering_inlines_native_and_matches_eager_bitwise() -> None:
    x, residual, weight = _inputs()
    res_eager = residual.clone()
    out_eager, _ = _model(x, res_eager, weight)
    torch._dynamo.reset()
    compiled = torch.compile(_model, backend=lowering.make_backend("aot_eager"), fullgraph=True)
    res_compiled = residual.clone()
    out_compiled, _ = compiled(x, res_compiled, weight)
    assert [(r.op, r.provider, r.inlined) for r in lowering.last_lowering] == [
        ("rms_norm", "native", True),
        ("silu_and_mul", "native", True),
        ("fused_add_rms_norm_", "native", True),
    ]
    assert torch.equal(out_compiled, out_eager)
    assert torch.equal(res_compiled, res_eager), "in-place residual update must survive compilation"


def test_lowering_picks_the_same_provider_as_eager(scale_op: IrOp) -> None:
    calls: list[str] = []

    def fast(x: torch.Tensor, factor: float) -> torch.Tensor:
        calls.append("fast")
        return x * factor

    scale_op.register_impl("fast", supports_args=lambda x, factor: x.dtype == torch.float32 or "fp32 only")(
        fast
    )

    def f(x: torch.Tensor) -> torch.Tensor:
        return scale_op(x, 3.0) + 1

    with scale_op.priority(["fast", "native"]):
        for dtype, expected in [(torch.float32, "fast"), (torch.float16, "native")]:
            x = torch.randn(4, 8, dtype=dtype)
            assert scale_op.select(x, 3.0).name == expected
            torch._dynamo.reset()
            calls.clear()
            out = torch.compile(f, backend=lowering.make_backend("aot_eager"), fullgraph=True)(x)
            assert [r.provider for r in lowering.last_lowering] == [expected]
            assert lowering.last_lowering[0].inlined == (expected == "native")
            assert calls == (["fast"] if expected == "fast" else [])
            assert torch.equal(out, f(x))


def test_reshape_and_cache_native_inlines_without_data_dependent_shapes() -> None:
    key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8)

    def f(kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        ops.reshape_and_cache(key, value, kc, vc, slots)
        return kc.sum()

    compiled = torch.compile(f, backend=lowering.make_backend("aot_eager"), fullgraph=True)
    torch._dynamo.reset()
    for slots in (torch.tensor([3, -1, 0, 9]), torch.tensor([-1, -1, -1, -1])):
        kc_e, vc_e = torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
        kc_c, vc_c = kc_e.clone(), vc_e.clone()
        with ops.reshape_and_cache.priority(["native"]):  # where treadle-kernels is installed, not its cpu op
            f(kc_e, vc_e, slots)
            compiled(kc_c, vc_c, slots)
        assert [(r.provider, r.inlined) for r in lowering.last_lowering] == [("native", True)]
        assert torch.equal(kc_c, kc_e) and torch.equal(vc_c, vc_e)


def _halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


_HALVE = op(name="test_halve_opaque", inline_native=False)(_halve)


def test_native_marked_opaque_stays_a_custom_op() -> None:
    x = torch.randn(3)
    torch._dynamo.reset()
    out = torch.compile(lambda t: _HALVE(t) + 1, backend=lowering.make_backend("aot_eager"), fullgraph=True)(
        x
    )
    assert [(r.provider, r.inlined) for r in lowering.last_lowering] == [("native", False)]
    assert torch.equal(out, x / 2 + 1)


@pytest.mark.slow
def test_inductor_compiles_lowered_native() -> None:
    def f(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out, res = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
        return out * res

    x, residual, weight = _inputs()
    torch._dynamo.reset()
    out = torch.compile(f, backend=lowering.compile_backend, fullgraph=True)(x, residual, weight)
    assert [(r.op, r.provider, r.inlined) for r in lowering.last_lowering] == [
        ("fused_add_rms_norm", "native", True)
    ]
    torch.testing.assert_close(out, f(x, residual, weight), rtol=1e-6, atol=1e-6)
