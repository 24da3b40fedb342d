"""RMS norms as modules holding their weight; the arithmetic is the IR op's (`ops.rms_norm`, `ops.gemma_rms_norm`).

RMSNorm:       y = x / sqrt(mean(x²) + eps) * w          (Llama, Qwen); add_and_norm fuses the residual add,
                                                         add_norm_linear also the projection after it
GemmaRMSNorm:  y = x / sqrt(mean(x²) + eps) * (1 + w)    (Gemma; computed in fp32, cast back; w stored as offset)
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_ir import ops
from treadle_model_runner.layers.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` in one fused op: the residual stream of a pre-norm block."""
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def add_norm_linear(
        self, x: torch.Tensor, residual: torch.Tensor, linear: Linear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(linear(norm(x + residual)), x + residual)`` as one op: the norm feeds the projection after it.
        In a step that runs a LoRA adapter the projection needs the normed rows themselves, and an fp8 one quantizes
        them: those run unfused."""
        if not linear.fusable:
            h, residual = self.add_and_norm(x, residual)
            return linear(h), residual
        return ops.add_rms_norm_linear(x, residual, self.weight, self.eps, linear.weight, linear.bias)


class GemmaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gemma_rms_norm(x, self.weight, self.eps)
