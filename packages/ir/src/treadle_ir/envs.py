"""Environment variables read by treadle_ir, declared once, typed, read lazily.

Every variable is read through a function at the moment it is needed, so tests may set it with
``monkeypatch.setenv`` after import. A malformed value raises ``ValueError`` naming the variable, the value
and the accepted forms. No other module of treadle_ir reads ``os.environ``.
"""

from __future__ import annotations

import os

__all__ = ["TREADLE_BATCH_INVARIANT", "TREADLE_IR_DISABLE_PLUGINS", "TREADLE_IR_OP_PRIORITY", "parse_bool"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean environment value; raise naming ``name`` when it is not a boolean."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"environment variable {name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off"
    )


def TREADLE_IR_OP_PRIORITY() -> str:
    """Per-op provider priority, e.g. ``"rms_norm=triton,native;silu_and_mul=native"`` (empty: defaults).

    Parsed and validated by :func:`treadle_ir.config.parse_op_priority`.
    """
    return os.environ.get("TREADLE_IR_OP_PRIORITY", "")


def TREADLE_BATCH_INVARIANT() -> bool:
    """``1`` keeps only providers registered with ``batch_invariant=True`` (native is always kept)."""
    return parse_bool("TREADLE_BATCH_INVARIANT", os.environ.get("TREADLE_BATCH_INVARIANT", "0"))


def TREADLE_IR_DISABLE_PLUGINS() -> bool:
    """``1`` skips loading out-of-tree providers from the ``treadle.kernels`` entry-point group."""
    return parse_bool("TREADLE_IR_DISABLE_PLUGINS", os.environ.get("TREADLE_IR_DISABLE_PLUGINS", "0"))
