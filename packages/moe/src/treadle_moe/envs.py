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


def triton_router() -> bool:
    """TREADLE_MOE_TRITON_ROUTER: route on CUDA in one Triton launch (router_triton.py); 0 = the torch ops
    (router.py), for comparisons. Default on."""
    value = os.environ.get("TREADLE_MOE_TRITON_ROUTER", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"TREADLE_MOE_TRITON_ROUTER={value!r} must be 0 or 1 (or unset: 1)")
    return value in ("1", "true", "on", "yes")


def triton_interpret() -> bool:
    """TRITON_INTERPRET (Triton's own variable): kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def moe_int4_gemv_max_tokens() -> int | None:
    """TREADLE_MOE_INT4_GEMV_MAX_TOKENS: 4-bit fused MoE runs its GEMV kernel (experts/triton_int4_gemv.py) up to
    this many tokens (rows of the experts' input) and the tl.dot kernel above; 0 never runs the GEMV kernel;
    unset = the default threshold (experts/triton_int4.py)."""
    value = os.environ.get("TREADLE_MOE_INT4_GEMV_MAX_TOKENS", "").strip()
    if not value:
        return None
    try:
        tokens = int(value)
    except ValueError:
        tokens = -1
    if tokens < 0:
        raise ValueError(
            f"TREADLE_MOE_INT4_GEMV_MAX_TOKENS={value!r} must be a token count >= 0 (0 disables the 4-bit GEMV "
            "kernel), or unset for the default"
        )
    return tokens


def mxfp4_decode() -> str | None:
    """TREADLE_MXFP4_DECODE: how the MXFP4 fused-MoE GEMM decodes its weights on a GPU with bf16 activations
    (experts/triton_mxfp4_kernels.py): "bf16" (packed bf16 pairs by inline PTX) or "fp32" (float32 bit placement,
    Triton ops); unset = the default."""
    value = os.environ.get("TREADLE_MXFP4_DECODE", "").strip().lower()
    if not value:
        return None
    if value not in ("bf16", "fp32"):
        raise ValueError(f"TREADLE_MXFP4_DECODE={value!r} must be bf16 or fp32, or unset for the default")
    return value
