"""Environment variables read by treadle_kernels, declared once and read lazily.

``TRITON_INTERPRET`` belongs to Triton (it must be set before triton is imported); treadle reads it only to
decide whether Triton providers may run on CPU tensors (tests at tiny sizes).
"""

from __future__ import annotations

import os

from treadle_ir.envs import parse_bool

__all__ = ["TRITON_INTERPRET"]


def TRITON_INTERPRET() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return parse_bool("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
