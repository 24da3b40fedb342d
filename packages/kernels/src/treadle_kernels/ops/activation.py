"""Triton providers for ``silu_and_mul``, ``gelu_tanh_and_mul`` and gpt-oss's ``swigluoai_and_mul``:
x [..., 2d] -> [..., d].

Launches :mod:`.activation_kernels` (imported on first call). Leading dims are flattened into rows; the
last dim must be unit-stride (rows may be strided, e.g. a column slice of a larger buffer).
"""

from __future__ import annotations

import torch

from treadle_ir import ops

from .support import check_tensor, rows_view, triton_supported

__all__ = ["register"]

BLOCK = 1024  # output columns per program


def _launch(x: torch.Tensor, gelu_tanh: bool, swigluoai: tuple[float, float] | None = None) -> torch.Tensor:
    """``swigluoai``: gpt-oss's (alpha, limit), replacing the silu / gelu activation."""
    from . import activation_kernels

    d = x.shape[-1] // 2
    x2 = rows_view(x)
    if x2 is None:
        x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)  # [rows, d]
    if x2.shape[0] > 0 and d > 0:
        block = min(BLOCK, max(16, 1 << (d - 1).bit_length()))
        grid = (x2.shape[0], triton_cdiv(d, block))
        alpha, limit = swigluoai or (0.0, 0.0)
        activation_kernels.act_and_mul_kernel[grid](
            x2, x2.stride(0), out, out.stride(0), d, float(alpha), float(limit), GELU_TANH=gelu_tanh,
            BLOCK=block, SWIGLUOAI=swigluoai is not None, num_warps=4,
        )  # fmt: skip
    return out.view(*x.shape[:-1], d)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _launch(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _launch(x, gelu_tanh=True)


def swigluoai_and_mul(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    return _launch(x, gelu_tanh=False, swigluoai=(alpha, limit))


def _check(x: torch.Tensor, *_: float) -> bool | str:
    if (reason := check_tensor(x, "x")) is not None:
        return reason
    if x.dim() == 0 or x.shape[-1] % 2:
        return f"last dim {x.shape[-1] if x.dim() else None} must be even"
    return True


def register(provider: str = "triton") -> None:
    """Register the Triton gated-activation providers under ``provider``."""
    ops.silu_and_mul.register_impl(
        provider, supported=triton_supported, supports_args=_check, batch_invariant=True
    )(silu_and_mul)
    ops.gelu_tanh_and_mul.register_impl(
        provider, supported=triton_supported, supports_args=_check, batch_invariant=True
    )(gelu_tanh_and_mul)
    ops.swigluoai_and_mul.register_impl(
        provider, supported=triton_supported, supports_args=_check, batch_invariant=True
    )(swigluoai_and_mul)
