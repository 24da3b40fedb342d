"""Gated activations: ``act(x[..., :d]) * x[..., d:]`` for SiLU (SwiGLU) and tanh-approximated GELU (GeGLU),
and gpt-oss's clamped SwiGLU (``swigluoai_and_mul``).

Numerics: the activation is evaluated in fp32 and rounded to the input dtype, then multiplied by the gate
half and rounded again (what ``F.silu(a) * b`` does in eager torch for half types). ``swigluoai_and_mul`` is
evaluated wholly in fp32 and rounded once (HF's gpt-oss rounds after each elementwise step in the model dtype;
the two agree to the dtype's rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..op import op

__all__ = ["gelu_tanh_and_mul", "silu_and_mul", "swigluoai_and_mul"]


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


def _example_swigluoai(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, float, float]:
    x = torch.randn(8, 2 * 2880, device=device, dtype=dtype)  # gpt-oss: [num_tokens, 2 * intermediate]
    return x, 1.702, 7.0


@op(example=_example_swigluoai)
def swigluoai_and_mul(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: x [..., 2d] (gate | up) -> [..., d] = (up + 1) * g * sigmoid(alpha * g) with
    g = min(gate, limit) and up clamped to [-limit, limit] (HF `GptOssExperts._apply_gate`, on plain halves: a
    checkpoint's interleaved gate/up columns are split before they reach an op)."""
    a, b = _halves(x)
    gate = a.float().clamp(max=limit)
    up = b.float().clamp(-limit, limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)).to(x.dtype)
