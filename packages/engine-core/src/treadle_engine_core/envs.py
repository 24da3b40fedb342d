"""Environment variables read by treadle_engine_core, declared once, typed, read when needed.

A malformed value raises ``ValueError`` naming the variable, the value and the accepted forms. No other module of
treadle_engine_core reads ``os.environ``.
"""

from __future__ import annotations

import math
import os

__all__ = ["TREADLE_GIL_SWITCH_INTERVAL_S"]


def TREADLE_GIL_SWITCH_INTERVAL_S(default: float) -> float | None:
    """CPython's GIL switch interval (seconds) while the async-scheduling worker thread runs beside the engine's
    (executor.py); ``0`` leaves the interpreter's own (5 ms unless the program changed it); unset: ``default``."""
    name = "TREADLE_GIL_SWITCH_INTERVAL_S"
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > 1:
        raise ValueError(
            f"environment variable {name}={raw!r} is not a switch interval; give seconds from 0 to 1 "
            "(e.g. 0.0005; 0 leaves the interpreter's own)"
        )
    return value or None
