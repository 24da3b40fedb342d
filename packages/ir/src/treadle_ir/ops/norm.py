"""Normalisation ops: RMSNorm, residual-add + RMSNorm (functional and in-place), Gemma's ``1 + weight`` form.

Numerics (the contract every provider matches): statistics in fp32 over the last dim; for ``rms_norm`` the
normalised row is rounded to the input dtype before the weight multiply (Llama/HF order), the result has
the input dtype. ``fused_add_rms_norm`` first forms ``residual_out = x + residual`` rounded to the input
dtype and normalises that rounded sum, which is what an unfused model computes.
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = ["fused_add_rms_norm", "fused_add_rms_norm_", "gemma_rms_norm", "rms_norm"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    x = torch.randn(8, 4096, device=device, dtype=dtype)  # [num_tokens, hidden]
    return x, torch.ones(4096, device=device, dtype=dtype), 1e-6


def _example_add(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x, weight, eps = _example(device, dtype)
    return x, torch.randn_like(x), weight, eps  # type: ignore[return-value]


def _normalize(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + epsilon)


@op(example=_example)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``(x / rms(x)).to(x.dtype) * weight``, result in ``x.dtype``.

    x [..., hidden]; weight [hidden].
    """
    return (_normalize(x, epsilon).to(x.dtype) * weight).to(x.dtype)


@op(example=_example_add)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = x + residual`` (in x.dtype); returns ``(rms_norm(residual_out), residual_out)``."""
    residual_out = (x + residual).to(x.dtype)
    out = (_normalize(residual_out, epsilon).to(x.dtype) * weight).to(x.dtype)
    return out, residual_out


@op(mutates_args=("x", "residual"), example=_example_add)
def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    """In-place ``fused_add_rms_norm``: ``residual`` becomes ``x + residual``, ``x`` becomes its norm."""
    residual.copy_(x + residual)
    x.copy_(_normalize(residual, epsilon).to(x.dtype) * weight)


@op(example=_example)
def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Gemma RMSNorm, all in fp32: ``(x / rms(x)) * (1 + weight)``, cast back to ``x.dtype``."""
    return (_normalize(x, epsilon) * (1.0 + weight.float())).to(x.dtype)
