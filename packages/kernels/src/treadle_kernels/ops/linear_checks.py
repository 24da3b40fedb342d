"""Argument checks and registration shared by the linear ops' providers (``triton``: linear.py, ``onednn``:
linear_onednn.py): the shapes the native specs take, with each provider's own test of a single tensor (device,
dtype, layout) plugged in."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from treadle_ir import ops

from .support import rows_view

TensorCheck = Callable[[torch.Tensor, str], "str | None"]  # None when the provider can read the tensor


class LinearChecks:
    """``supports_args`` of the four linear ops for a provider whose tensor test is ``tensor_reason``."""

    def __init__(self, tensor_reason: TensorCheck) -> None:
        self.tensor_reason = tensor_reason

    def linear(self, x: torch.Tensor, k: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool | str:
        for name, t in (("x", x), ("weight", weight), *((("bias", bias),) if bias is not None else ())):
            if (reason := self.tensor_reason(t, name)) is not None:
                return reason
        if x.dim() == 0 or rows_view(x) is None:
            return "x must be viewable as [rows, features] without a copy"
        if weight.dim() != 2 or not weight.is_contiguous() or weight.shape[1] != k:
            return f"weight {tuple(weight.shape)} must be contiguous [out, {k}]"
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return f"weight/bias dtype differs from x ({x.dtype})"
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            return f"bias {tuple(bias.shape)} does not match {weight.shape[0]} outputs"
        return True

    def plain(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool | str:
        return self.linear(x, x.shape[-1] if x.dim() else -1, weight, bias)

    def norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        norm_weight: torch.Tensor,
        epsilon: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> bool | str:
        for name, t in (("residual", residual), ("norm_weight", norm_weight)):
            if (reason := self.tensor_reason(t, name)) is not None:
                return reason
        if residual.shape != x.shape or rows_view(residual) is None:
            return "residual must have x's shape and be viewable as rows"
        if norm_weight.shape != (x.shape[-1],) or norm_weight.dtype != x.dtype:
            return f"norm_weight {tuple(norm_weight.shape)} must be [{x.shape[-1]}] in {x.dtype}"
        return self.plain(x, weight, bias)

    def gated(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool | str:
        if x.dim() == 0 or x.shape[-1] % 2:
            return f"last dim {x.shape[-1] if x.dim() else None} must be even (gate | up)"
        return self.linear(x, x.shape[-1] // 2, weight, bias)


def register_linear_ops(
    provider: str, impls: ModuleType, supported: Callable[..., bool | str], checks: LinearChecks
) -> None:
    """Register ``impls``'s ``linear``, ``add_rms_norm_linear``, ``silu_and_mul_linear`` and
    ``gelu_tanh_and_mul_linear`` as ``provider`` of the IR ops of those names."""
    for name, check in (
        ("linear", checks.plain),
        ("add_rms_norm_linear", checks.norm),
        ("silu_and_mul_linear", checks.gated),
        ("gelu_tanh_and_mul_linear", checks.gated),
    ):
        getattr(ops, name).register_impl(provider, supported=supported, supports_args=check)(
            getattr(impls, name)
        )
