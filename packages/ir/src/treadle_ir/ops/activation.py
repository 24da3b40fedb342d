"""Gated activations: ``act(x[..., :d]) * x[..., d:]`` for SiLU (SwiGLU) and tanh-approximated GELU (GeGLU).

Numerics: the activation is evaluated in fp32 and rounded to the input dtype, then multiplied by the gate
half and rounded again (what ``F.silu(a) * b`` does in eager torch for half types).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..op import op

__all__ = ["gelu_tanh_and_mul", "silu_and_mul"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
    return (torch.randn(8, 2 * 14336, device=device, dtype=dtype),)  # [num_tokens, 2 * intermediate]


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1] // 2  # an odd last dim leaves b one wider than a, and the multiply raises
    return x[..., :d], x[..., d:]


@op(example=_example)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> [..., d] = silu(x[..., :d]) * x[..., d:]."""
    a, b = _halves(x)
    return F.silu(a) * b


@op(example=_example)
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> [..., d] = gelu_tanh(x[..., :d]) * x[..., d:]."""
    a, b = _halves(x)
    return F.gelu(a, approximate="tanh") * b
