"""Entry-point plugins (group ``treadle.kernels``): loaded lazily, once; a broken one warns by name."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch

import treadle_ir
from treadle_ir import IrOp, plugins


def _entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=plugins.ENTRY_POINT_GROUP)


def test_plugins_load_lazily_and_broken_ones_warn(scale_op: IrOp, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fake_treadle_plugin")

    def register() -> None:
        @scale_op.register_impl("plugged")
        def plugged(x: torch.Tensor, factor: float) -> torch.Tensor:
            return x * (10 * factor)

    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_treadle_plugin", module)
    entry_points = [
        _entry_point("good", "fake_treadle_plugin:register"),
        _entry_point("broken", "no_such_module_for_treadle_tests:register"),
    ]
    monkeypatch.setattr(plugins, "_entry_points", lambda: entry_points)
    monkeypatch.setattr(plugins, "_loaded", False)
    plugins._results.clear()
    assert "plugged" not in scale_op.providers  # nothing loaded at registration/import time
    treadle_ir.refresh()
    x = torch.ones(2)
    warning = r"plugin broken \(no_such_module_for_treadle_tests:register\)"
    with pytest.warns(RuntimeWarning, match=warning), scale_op.priority(["plugged"]):
        assert torch.equal(scale_op(x, 1.0), 10 * x)  # first resolution loads the plugins
    assert plugins.loaded_plugins()["good"] == "loaded"
    assert plugins.loaded_plugins()["broken"].startswith("failed: ModuleNotFoundError")
    assert "broken: failed" in treadle_ir.report()
    plugins.load_plugins()  # loaded once: no second warning, no re-registration


def test_plugins_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "_entry_points", lambda: [_entry_point("broken", "no_such_module_x:f")])
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setenv("TREADLE_IR_DISABLE_PLUGINS", "1")
    plugins._results.clear()
    assert plugins.load_plugins() == {}
