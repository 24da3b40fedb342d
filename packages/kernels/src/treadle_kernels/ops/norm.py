"""Triton providers for the RMSNorm ops: ``rms_norm``, ``fused_add_rms_norm`` (+ in-place), ``gemma_rms_norm``.

The provider functions have exactly the native signatures (treadle_ir checks it) and launch
:mod:`.norm_kernels`, imported on first call so importing treadle_kernels never needs Triton.
Rows: every leading dim is flattened into rows; the last dim must be unit-stride. In-place forms need
inputs viewable as 2-D rows (no copy), otherwise dispatch falls back to native.
"""

from __future__ import annotations

from typing import Any

import torch

from treadle_ir import ops

from .support import check_tensor, next_pow2, rows_view, triton_supported

__all__ = ["register"]

MAX_HIDDEN = 65536  # whole row in registers; larger rows fall back to native


def _num_warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


def _check(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor, inplace: bool = False) -> bool | str:
    for name, t in (("x", x), ("weight", weight), *(("residual", o) for o in others)):
        if (reason := check_tensor(t, name)) is not None:
            return reason
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN}"
    if weight.dim() != 1 or weight.shape[0] != hidden:
        return f"weight shape {tuple(weight.shape)} does not match hidden {hidden}"
    if any(o.shape != x.shape for o in others):
        return "residual shape differs from x"
    if inplace and any(rows_view(t) is None for t in (x, *others)):
        return "in-place form needs inputs viewable as [rows, hidden] without a copy"
    return True


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
    epsilon: float,
    gemma: bool,
) -> None:
    from . import norm_kernels

    hidden = x.shape[-1]
    num_rows = x.shape[0]
    if num_rows == 0:
        return
    block = next_pow2(hidden)
    has_residual = residual is not None
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else out
    norm_kernels.rms_norm_kernel[(num_rows,)](
        x,
        x.stride(0),
        res,
        res.stride(0),
        weight,
        out,
        out.stride(0),
        res_out,
        res_out.stride(0),
        hidden,
        epsilon,
        HAS_RESIDUAL=has_residual,
        GEMMA=gemma,
        BLOCK=block,
        num_warps=_num_warps(block),
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    view = rows_view(t)
    return view if view is not None else t.reshape(-1, t.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # [rows, hidden]
    _launch(x2, None, weight, out, None, epsilon, gemma=False)
    return out.view(x.shape)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # [rows, hidden]
    _launch(x2, None, weight, out, None, epsilon, gemma=True)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # [rows, hidden]
    residual_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # [rows, hidden]
    _launch(x2, r2, weight, out, residual_out, epsilon, gemma=False)
    return out.view(x.shape), residual_out.view(x.shape)


def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    x2, r2 = rows_view(x), rows_view(residual)
    assert x2 is not None and r2 is not None, "supports_args guarantees row views"
    _launch(x2, r2, weight, x2, r2, epsilon, gemma=False)


def _check_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> bool | str:
    return _check(x, weight)


def _check_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> bool | str:
    if residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} differs from x dtype {x.dtype}"
    return _check(x, weight, residual)


def _check_add_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> bool | str:
    if residual.dtype != x.dtype:
        return f"residual dtype {residual.dtype} differs from x dtype {x.dtype}"
    return _check(x, weight, residual, inplace=True)


def register(provider: str = "triton") -> None:
    """Register the Triton norm providers under ``provider``."""
    common: dict[str, Any] = {"supported": triton_supported, "batch_invariant": True}
    ops.rms_norm.register_impl(provider, supports_args=_check_norm, **common)(rms_norm)
    ops.gemma_rms_norm.register_impl(provider, supports_args=_check_norm, **common)(gemma_rms_norm)
    ops.fused_add_rms_norm.register_impl(provider, supports_args=_check_add, **common)(fused_add_rms_norm)
    ops.fused_add_rms_norm_.register_impl(provider, supports_args=_check_add_, **common)(fused_add_rms_norm_)
