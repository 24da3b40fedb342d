"""Shared fixtures: a test-only IR op (declared once per process) and clean dispatch state per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import treadle_ir
from treadle_ir import IrConfig, IrOp, plugins


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Test op: ``x * factor``."""
    return x * factor


_SCALE: IrOp = treadle_ir.op(
    name="test_scale", example=lambda device, dtype: (torch.ones(4, device=device, dtype=dtype), 2.0)
)(_scale)


@pytest.fixture
def scale_op() -> Iterator[IrOp]:
    """The ``test_scale`` op with only its native provider; extra providers are removed afterwards."""
    yield _SCALE
    for name in list(_SCALE.providers):
        if name != "native":
            _SCALE.unregister_impl(name)


@pytest.fixture(autouse=True)
def _clean_dispatch_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("TREADLE_IR_OP_PRIORITY", raising=False)
    monkeypatch.delenv("TREADLE_BATCH_INVARIANT", raising=False)
    treadle_ir.set_config(IrConfig())
    yield
    treadle_ir.set_config(IrConfig())
    plugins._loaded = True  # never load real entry points from tests after a plugin test reset it
