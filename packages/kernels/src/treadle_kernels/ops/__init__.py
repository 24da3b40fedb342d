"""Providers for treadle_ir ops. Importing this package registers them without importing Triton.

Each ``<noun>.py`` holds provider functions with the native signatures and their argument checks;
``<noun>_kernels.py`` holds the ``@triton.jit`` kernels and is imported on the first launch.
"""

from __future__ import annotations

from . import (
    activation,
    cache,
    fp8_block_linear,
    fp8_linear,
    host,
    linear,
    linear_onednn,
    logprobs,
    norm,
    rotary,
    sampling,
)
from .w4a16_host import register as register_w4a16_host
from .w4a16_linear import register as register_w4a16_triton

__all__ = ["register_cpu_providers", "register_triton_providers"]

_registered = False


def register_triton_providers() -> None:
    """Register the Triton provider of every IR op (idempotent)."""
    global _registered
    if _registered:
        return
    for module in (norm, activation, rotary, cache, linear, fp8_linear, fp8_block_linear, sampling, logprobs):
        module.register()
    register_w4a16_triton()
    _registered = True


def register_cpu_providers() -> None:
    """Register the CPU providers (re-registering replaces them): ``onednn`` for the linear ops, ``cpu`` for the
    KV-cache write, the in-place rotary embedding and the 4-bit linear."""
    linear_onednn.register()
    host.register()
    register_w4a16_host()
