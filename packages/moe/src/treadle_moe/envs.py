"""Environment variables read by treadle_moe, declared once here (typed, validated, TREADLE_-prefixed)."""

from __future__ import annotations

import os

MOE_BACKENDS: tuple[str, ...] = ("torch", "triton", "torch_batched", "triton_batched")


def moe_backend() -> str | None:
    """TREADLE_MOE_BACKEND: force the oracle's experts choice (unset = automatic)."""
    value = os.environ.get("TREADLE_MOE_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in MOE_BACKENDS:
        raise ValueError(
            f"TREADLE_MOE_BACKEND={value!r} is unknown; valid: {', '.join(MOE_BACKENDS)} (or unset)"
        )
    return value


def triton_interpret() -> bool:
    """TRITON_INTERPRET (Triton's own variable): kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
