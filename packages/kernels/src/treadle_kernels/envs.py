"""Environment variables read by treadle_kernels, declared once and read lazily.

``TRITON_INTERPRET`` belongs to Triton (it must be set before triton is imported); treadle reads it only to
decide whether Triton providers may run on CPU tensors (tests at tiny sizes).
"""

from __future__ import annotations

import os

from treadle_ir.envs import parse_bool

__all__ = [
    "FP8_LINEAR_MAX_ROWS",
    "FUSED_DECODE_ATTENTION",
    "PDL",
    "SMALL_BATCH_LINEAR_MAX_ROWS",
    "STREAM_LINEAR",
    "TRITON_INTERPRET",
    "W4A16_DEQUANT_MIN_ROWS",
    "W4A16_GEMV_MAX_ROWS",
]


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


def FP8_LINEAR_MAX_ROWS(limit: int, default: int) -> int:
    """Rows up to which ``fp8_linear`` runs the fp8 weight-streaming Triton kernel (``TREADLE_FP8_LINEAR_MAX_ROWS``,
    0 to ``limit``; default ``default``); more rows quantize the activations and run ``torch._scaled_mm``."""
    return _rows_knob("TREADLE_FP8_LINEAR_MAX_ROWS", limit, default)


def _rows_knob(name: str, limit: int, default: int) -> int:
    """The integer from 0 to ``limit`` that variable ``name`` holds (``default`` when unset); ValueError otherwise."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= limit:
        raise ValueError(f"{name}={raw!r}: expected an integer from 0 to {limit}")
    return value


def W4A16_DEQUANT_MIN_ROWS() -> int:
    """Rows from which ``w4a16_linear`` dequantizes the 4-bit weight and multiplies by cuBLAS instead of unpacking in
    its GEMM (``TREADLE_W4A16_DEQUANT_MIN_ROWS``, a positive integer; default 128)."""
    raw = os.environ.get("TREADLE_W4A16_DEQUANT_MIN_ROWS", "128")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"TREADLE_W4A16_DEQUANT_MIN_ROWS={raw!r}: expected a positive integer")
    return value


def W4A16_GEMV_MAX_ROWS(limit: int, default: int) -> int:
    """Rows up to which ``w4a16_linear`` runs its GEMV kernel (fp32 FMAs, ops/w4a16_gemv.py) instead of the
    tensor-core kernel (``TREADLE_W4A16_GEMV_MAX_ROWS``, 0 to ``limit``; default ``default``; 0 turns it off)."""
    return _rows_knob("TREADLE_W4A16_GEMV_MAX_ROWS", limit, default)


def FUSED_DECODE_ATTENTION() -> bool:
    """``TREADLE_FUSED_DECODE_ATTENTION`` (default 1): the Triton attention backend runs rotary, the KV-cache write
    and split-KV attention of a decode step in one kernel; 0 runs them as separate launches."""
    return parse_bool("TREADLE_FUSED_DECODE_ATTENTION", os.environ.get("TREADLE_FUSED_DECODE_ATTENTION", "1"))


def PDL() -> bool:
    """``TREADLE_PDL=1`` (Hopper+; default off): the one-row linear kernel and the fused decode attention kernel
    launch with programmatic dependent launch, each requesting the weights or metadata it can read before the
    kernel ahead of it finishes."""
    return parse_bool("TREADLE_PDL", os.environ.get("TREADLE_PDL", "0"))


def STREAM_LINEAR() -> bool:
    """``TREADLE_STREAM_LINEAR=1`` (default off): one-row projections below the lm_head's size run the persistent,
    pipelined weight-streaming kernel (``ops/linear_stream_kernels.py``) instead of the one-program-per-tile kernel.
    Faster alone on an H200, slower end to end there (results/gpu-stream-h200-815d627)."""
    return parse_bool("TREADLE_STREAM_LINEAR", os.environ.get("TREADLE_STREAM_LINEAR", "0"))
