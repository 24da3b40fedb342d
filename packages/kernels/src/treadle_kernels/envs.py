"""Environment variables read by treadle_kernels, declared once and read lazily.

``TRITON_INTERPRET`` belongs to Triton (it must be set before triton is imported); treadle reads it only to
decide whether Triton providers may run on CPU tensors (tests at tiny sizes).
"""

from __future__ import annotations

import os

from treadle_ir.envs import parse_bool

__all__ = ["SMALL_BATCH_LINEAR_MAX_ROWS", "TRITON_INTERPRET"]


def TRITON_INTERPRET() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return parse_bool("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))


def SMALL_BATCH_LINEAR_MAX_ROWS(limit: int) -> int:
    """Rows up to which the fused linear ops may run the weight-streaming Triton kernel
    (``TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS``, 0 to ``limit``; default 1: batch-1 decode; 0: norm/activation kernel
    + cuBLAS everywhere)."""
    raw = os.environ.get("TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS")
    if raw is None:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= limit:
        raise ValueError(
            f"TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS={raw!r}: expected an integer from 0 to {limit}"
        )
    return value
