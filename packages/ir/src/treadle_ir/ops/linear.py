"""Linear layers with the op before them fused in: ``linear``, ``add_rms_norm_linear``, ``*_and_mul_linear``.

Why they are ops: in a decode step at small batch every matmul is a matrix-vector product bound by reading the
weight, and the norm or gated activation before it is a separate tiny launch. Declaring the pair as one op lets
a provider read the activations once, apply the prologue on the fly and stream the weight (one launch instead
of two or three, and no split-K reduction).

Numerics (what every provider matches): the prologue is exactly the standalone op's (``fused_add_rms_norm``
rounds ``x + residual`` and the normalised row to the input dtype; the gated activations round ``act(a)`` and
``act(a) * b``), then ``F.linear`` with fp32 accumulation. The weight is [out_features, in_features] like
``nn.Linear``; bias is optional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..op import op
from .activation import gelu_tanh_and_mul, silu_and_mul
from .norm import fused_add_rms_norm

__all__ = ["add_rms_norm_linear", "gelu_tanh_and_mul_linear", "linear", "silu_and_mul_linear"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, None]:
    x = torch.randn(1, 4096, device=device, dtype=dtype)  # one decode token
    return x, torch.empty(4096, 4096, device=device, dtype=dtype), None  # the report needs shapes only


def _example_norm(device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    x, weight, bias = _example(device, dtype)
    norm_weight = torch.ones(4096, device=device, dtype=dtype)
    return x, torch.randn_like(x), norm_weight, 1e-6, weight, bias


def _example_act(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, None]:
    x = torch.randn(1, 2 * 14336, device=device, dtype=dtype)  # [tokens, gate | up]
    return x, torch.empty(4096, 14336, device=device, dtype=dtype), None


@op(example=_example)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``: x [..., in]; weight [out, in]; bias [out] or None."""
    return F.linear(x, weight, bias)


@op(example=_example_norm)
def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    epsilon: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(x + residual)), x + residual)``: a pre-norm block's residual add, its norm and the
    projection after it. x, residual [..., in]; norm_weight [in]; weight [out, in]."""
    normed, residual_out = fused_add_rms_norm.native(x, residual, norm_weight, epsilon)
    return F.linear(normed, weight, bias), residual_out


@op(example=_example_act)
def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear(silu_and_mul(x))``: x [..., 2 * in] (gate | up); weight [out, in]. A gated MLP's down_proj."""
    return F.linear(silu_and_mul.native(x), weight, bias)


@op(example=_example_act)
def gelu_tanh_and_mul_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``linear(gelu_tanh_and_mul(x))``: x [..., 2 * in] (gate | up); weight [out, in] (Gemma's down_proj)."""
    return F.linear(gelu_tanh_and_mul.native(x), weight, bias)
