"""Gated activations of an expert MLP: `act(x[..., :d]) * x[..., d:]` for x [..., 2d].

The w13 GEMM of an expert yields the gate half then the up half (see the weight layout in layer.py); the
activation combines them into the d-wide input of the w2 GEMM. The reference path calls the IR op
(`treadle_ir.ops.silu_and_mul` / `gelu_tanh_and_mul` / `swigluoai_and_mul`) when the IR provides it, so the
platform's best provider runs; otherwise it falls back to the plain torch formula below, which is also the semantic
spec that the Triton kernel's fused epilogue must match.

"swigluoai" is gpt-oss's clamped SwiGLU: gate = min(gate, limit), up = clamp(up, -limit, limit),
out = (up + 1) * gate * sigmoid(alpha * gate); `alpha` and `limit` (the config's `swiglu_alpha` / `swiglu_limit`)
are ignored by the other activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_tanh", "swigluoai")
_IR_OP_NAMES = {"silu": "silu_and_mul", "gelu_tanh": "gelu_tanh_and_mul", "swigluoai": "swigluoai_and_mul"}
SWIGLU_ALPHA = 1.702  # gpt-oss's swiglu_alpha
SWIGLU_LIMIT = 7.0  # gpt-oss's swiglu_limit


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")


def act_and_mul_native(
    x: torch.Tensor, activation: str, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    """x [..., 2d] -> [..., d], computed in float32 and cast back to x.dtype."""
    check_activation(activation)
    d = x.shape[-1] // 2
    gate, up = x[..., :d].float(), x[..., d:].float()
    if activation == "swigluoai":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return ((up + 1) * gate * torch.sigmoid(alpha * gate)).to(x.dtype)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return (act * up).to(x.dtype)


def act_and_mul(
    x: torch.Tensor, activation: str, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    """x [..., 2d] -> [..., d] through the IR op when available, else the native formula."""
    op = _ir_op(activation)
    if op is None:
        return act_and_mul_native(x, activation, alpha, limit)
    if activation == "swigluoai":
        return op(x, alpha, limit)
    return op(x)


_ir_cache: dict[str, Callable[..., torch.Tensor] | None] = {}


def _ir_op(activation: str) -> Callable[..., torch.Tensor] | None:
    check_activation(activation)
    if activation not in _ir_cache:
        name = _IR_OP_NAMES[activation]
        try:
            from treadle_ir import ops

            _ir_cache[activation] = getattr(ops, name)
        except Exception:  # an IR without the op, or one that fails to import, falls back to native
            logger.debug("treadle_ir.ops.%s not available; using the native %s formula", name, activation)
            _ir_cache[activation] = None
    return _ir_cache[activation]
