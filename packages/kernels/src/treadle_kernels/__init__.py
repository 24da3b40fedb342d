"""treadle_kernels — kernel implementations registered as providers for treadle_ir ops.

Importing this package registers a ``triton`` provider for every IR op (norms, gated activations, rotary,
KV-cache writes) and, for the linear ops on CPU, ``onednn`` (oneDNN's matmul on packed weights). Registration
never imports Triton: kernels are compiled on first use, and each provider's ``supported`` check reports
"triton is not installed" or "needs a CUDA GPU" where it cannot run, so dispatch falls back to native.
Attention backends live in :mod:`treadle_kernels.attention`.
"""

from __future__ import annotations

import contextlib
import importlib.util

from .ops import register_cpu_providers, register_triton_providers

register_triton_providers()
register_cpu_providers()

if importlib.util.find_spec(f"{__name__}.attention") is not None:
    with contextlib.suppress(ImportError):
        from . import attention  # noqa: F401  (re-exported subpackage; optional dependencies may be missing)

__all__ = ["register_cpu_providers", "register_triton_providers"]
