"""Compile lowering with Triton providers: the pass binds each IR node to the provider eager dispatch picks."""

from __future__ import annotations

import pytest
import torch

import treadle_kernels  # noqa: F401  (registers the triton providers)
from treadle_ir import lowering, ops

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    h = ops.silu_and_mul(x)
    ops.fused_add_rms_norm_(h, residual, weight, 1e-6)
    return h


def test_compiled_graph_calls_the_triton_provider() -> None:
    x, residual, weight = (
        torch.randn(3, 64, device=DEVICE),
        torch.randn(3, 32, device=DEVICE),
        torch.randn(32, device=DEVICE),
    )
    with ops.silu_and_mul.priority(["triton"]), ops.fused_add_rms_norm_.priority(["triton"]):
        res_eager = residual.clone()
        eager = _block(x, res_eager, weight)
        torch._dynamo.reset()
        res_compiled = residual.clone()
        compiled = torch.compile(_block, backend=lowering.make_backend("aot_eager"), fullgraph=True)(
            x, res_compiled, weight
        )
    assert [(r.op, r.provider, r.inlined) for r in lowering.last_lowering] == [
        ("silu_and_mul", "triton", False),
        ("fused_add_rms_norm_", "triton", False),
    ]
    assert torch.equal(compiled, eager)
    assert torch.equal(res_compiled, res_eager)
