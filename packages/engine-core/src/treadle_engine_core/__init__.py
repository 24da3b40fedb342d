"""treadle_engine_core."""

from __future__ import annotations

__all__: list[str] = []
