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

__all__ = ["register_cpu_providers", "register_triton_providers"]

_registered = False


def register_triton_providers() -> None:
    """Register the Triton provider of every IR op (idempotent)."""
    global _registered
    if _registered:
        return
    for module in (norm, activation, rotary, cache, linear, fp8_linear, fp8_block_linear, sampling, logprobs):
        module.register()
    _registered = True


def register_cpu_providers() -> None:
    """Register the CPU providers (re-registering replaces them): ``onednn`` for the linear ops, ``cpu`` for the
    KV-cache write and the in-place rotary embedding."""
    linear_onednn.register()
    host.register()
