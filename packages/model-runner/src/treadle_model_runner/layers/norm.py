"""RMS norms as modules holding their weight; the arithmetic is the IR op's (`ops.rms_norm`, `ops.gemma_rms_norm`).

RMSNorm:       y = x / sqrt(mean(x²) + eps) * w          (Llama, Qwen); add_and_norm fuses the residual add,
                                                         add_norm_linear also the projection after it
GemmaRMSNorm:  y = x / sqrt(mean(x²) + eps) * (1 + w)    (Gemma; computed in fp32, cast back; w stored as offset)
ShardedRMSNorm: RMSNorm over a width that tensor parallelism splits across ranks (OLMo 2's q/k norm spans every
                head): each rank holds its columns of x and of w; the sum of squares is all-reduced, then divided by
                local width x ranks, which is the full width also when key/value heads are replicated (each of the
                R ranks holding a head adds its squares once, and there are R times as many columns).
"""

from __future__ import annotations

import torch
from torch import nn

from treadle_ir import ops
from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.parallel import all_reduce, get_tp


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


class ShardedRMSNorm(RMSNorm):
    """This rank's `rows` of an RMSNorm of `full_size` (with one rank: all of them, a plain RMSNorm)."""

    def __init__(self, full_size: int, rows: slice, eps: float = 1e-6) -> None:
        super().__init__(rows.stop - rows.start, eps)
        self.full_size, self.rows, self.tp_size = full_size, rows, get_tp().size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        xf = x.float()
        mean_square = all_reduce(xf.pow(2).sum(-1, keepdim=True)) / (x.shape[-1] * self.tp_size)
        return (xf * torch.rsqrt(mean_square + self.eps)).to(x.dtype) * self.weight

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.full_size,)

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full[self.rows]
