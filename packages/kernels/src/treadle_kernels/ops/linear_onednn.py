"""The ``onednn`` provider of the linear IR ops on CPU: oneDNN's matmul on a weight packed once into its blocked
layout (what Inductor's CPU freezing does), instead of ``F.linear`` on the weight as stored.

On the 2-core AMD EPYC (avx512) machine CI runs on, float32 ``F.linear`` runs MKL's sgemm, and the packed oneDNN
matmul measured faster at every row count (SmolLM2's 576 -> 3072 projection: 0.37 -> 0.10 ms at 1 row, 1.85 ->
1.09 at 64, 29.6 -> 17.5 at 1024; its 49,152-token lm_head at 64 rows 38.0 -> 18.9 ms). In bfloat16 ``F.linear``
already goes through oneDNN, so packing gains little there; both dtypes are served.

The packed copy is made on a weight's first use and kept on the weight tensor; it is remade when the weight
changes (its storage, shape or in-place version counter). It costs as much memory again as the weights it
packs: packing stops once the copies reach a quarter of physical memory (the weights after that run
``F.linear``), and ``--ir-op-priority`` (e.g. ``linear=native``) or ``TREADLE_IR_OP_PRIORITY`` turns it off
per op. The prologues of the fused ops (norm, gated activation) run as their standalone ops first, so results
differ from native only by the matmul's summation order.
"""

from __future__ import annotations

import functools
import logging
import os
import platform as _py_platform
import sys
import threading
from typing import Any

import torch
import torch.nn.functional as F

from treadle_ir import ops
from treadle_ir.platforms import Platform

from .linear_checks import LinearChecks, register_linear_ops

__all__ = ["PROVIDER", "packed_weight", "register"]

PROVIDER = "onednn"
DTYPES = (torch.float32, torch.bfloat16)
_ATTR = "_treadle_onednn_packed"  # (key, packed or None) on the weight tensor
logger = logging.getLogger(__name__)


@functools.cache
def _onednn_reason() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    mkldnn = torch.ops.mkldnn
    if not (hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")):
        return "this torch build lacks torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise"
    return None


def supported(platform: Platform) -> bool | str:
    if not platform.is_cpu:
        return "CPU only (oneDNN's packed weights live in host memory)"
    if (machine := _py_platform.machine().lower()) not in ("x86_64", "amd64"):
        return f"measured on x86-64 only; this CPU is {machine or 'unknown'}"
    return _onednn_reason() or True


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return 0


class _Budget:
    """The bytes of packed copies one process may hold: a quarter of physical memory, so a large model on CPU
    keeps most of its memory (the weights past the budget stay unpacked and run ``F.linear``)."""

    def __init__(self) -> None:
        self.limit = _physical_memory() // 4
        self.used = 0
        self.lock = threading.Lock()
        self.warned = False

    def take(self, nbytes: int) -> bool:
        with self.lock:
            if self.used + nbytes > self.limit:
                if not self.warned:
                    logger.warning("onednn: packed linear weights reached %.1f GiB (a quarter of physical memory); "
                                   "the rest run unpacked", self.used / (1 << 30))  # fmt: skip
                    self.warned = True
                return False
            self.used += nbytes
            return True


_budget = _Budget()


def packed_weight(weight: torch.Tensor) -> Any:
    """``weight`` [out, in] in oneDNN's blocked layout, packed on first use and kept until the weight changes;
    None when the packing budget is spent (the weight is then used as it is)."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)
    cached = getattr(weight, _ATTR, None)
    if cached is None or cached[0] != key:
        nbytes = weight.numel() * weight.element_size()
        fresh = cached is not None and cached[1] is not None  # a repack reuses its own budget
        packed = None
        if fresh or _budget.take(nbytes):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            except RuntimeError as exc:  # a shape or build oneDNN refuses: this weight runs unpacked
                logger.warning(
                    "onednn: cannot pack a %s weight (%s); it runs unpacked", tuple(weight.shape), str(exc)
                )
        cached = (key, packed)
        setattr(weight, _ATTR, cached)
    return cached[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    packed = packed_weight(weight)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    epsilon: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    normed, residual_out = ops.fused_add_rms_norm(x, residual, norm_weight, epsilon)
    return linear(normed, weight, bias), residual_out


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear(ops.silu_and_mul(x), weight, bias)


def gelu_tanh_and_mul_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return linear(ops.gelu_tanh_and_mul(x), weight, bias)


def _tensor_reason(t: torch.Tensor, name: str) -> str | None:
    if t.device.type != "cpu":
        return f"{name} is on {t.device}, not the CPU"
    if t.dtype not in DTYPES:
        return f"{name} is {t.dtype}; oneDNN's packed matmul here takes float32 or bfloat16"
    if torch.is_grad_enabled() and t.requires_grad:
        return f"autograd: {name} requires grad and the packed matmul has no backward"
    return None


def register() -> None:
    """Register the ``onednn`` provider of every linear IR op."""
    register_linear_ops(PROVIDER, sys.modules[__name__], supported, LinearChecks(_tensor_reason))
