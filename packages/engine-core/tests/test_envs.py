"""Engine-core environment variables: parsed values, clear errors, and the GIL switch interval they set."""

from __future__ import annotations

import sys

import pytest

from treadle_engine_core import envs, executor

NAME = "TREADLE_GIL_SWITCH_INTERVAL_S"


@pytest.mark.parametrize(("raw", "want"), [("", 0.0005), ("0.002", 0.002), (" 1e-3 ", 0.001), ("0", None)])
def test_switch_interval_values(monkeypatch: pytest.MonkeyPatch, raw: str, want: float | None) -> None:
    monkeypatch.setenv(NAME, raw)
    assert envs.TREADLE_GIL_SWITCH_INTERVAL_S(0.0005) == want


@pytest.mark.parametrize("raw", ["fast", "-0.001", "2", "nan", "inf"])
def test_switch_interval_rejects(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(NAME, raw)
    with pytest.raises(ValueError, match=f"{NAME}=.*seconds from 0 to 1"):
        envs.TREADLE_GIL_SWITCH_INTERVAL_S(0.0005)


@pytest.mark.parametrize(("raw", "want"), [("", 0.0005), ("0.002", 0.002), ("0", 0.005)])
def test_worker_thread_sets_the_interval(monkeypatch: pytest.MonkeyPatch, raw: str, want: float) -> None:
    before = sys.getswitchinterval()
    monkeypatch.setenv(NAME, raw)
    try:
        sys.setswitchinterval(0.005)
        executor._shorten_gil_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(want)
    finally:
        sys.setswitchinterval(before)
