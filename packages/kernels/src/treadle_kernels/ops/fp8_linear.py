"""Triton / cuBLAS-Lt providers of the fp8 ops: ``quantize_fp8_rows`` and ``fp8_linear`` (``triton``).

``fp8_linear`` picks by the number of rows, like the bf16 linear provider (linear.py):
- up to ``TREADLE_FP8_LINEAR_MAX_ROWS`` rows (default ``DEFAULT_ROWS`` = 1, a batch-1 decode step; at most
  ``MAX_ROWS`` = 16), the weight-streaming kernel of :mod:`.fp8_linear_kernels`: it reads the fp8 weight once (half
  the bf16 bytes, which is what bounds a small batch) and quantizes the activations on the fly, in one launch.
  Measured on an H200 in CUDA graphs (benchmarks/fp8_gemv_sweep.py, results/gpu-fp8-lora-h200-*/call2): one row,
  qkv 10.3 / o_proj 8.4 / gate_up 37.8 / down 24.7 us against 13.7 / 10.1 / 55.1 / 28.9 for the bf16 path; but
  8 rows through its tl.dot variant took 72-250 us (bf16: 12-57), so 2-16 rows go to ``torch._scaled_mm`` too;
- more rows, the activations' quantization kernel, then ``torch._scaled_mm`` with row-wise scales (scale_a [M, 1],
  scale_b [1, N] fp32; the weight passed transposed, i.e. column-major; bf16 out: row-wise scaling takes bf16 only),
  the bias added after. It needs a bf16 input, k and n multiples of 16 and a Hopper GPU (compute capability >= 9.0);
  otherwise the spec runs (``fp8_linear.native``: dequantizing matmul in fp32, correct and slow).
Both compute the spec's numerics (see treadle_ir.ops.fp8): they differ from it only in the summation order. A given
``input_scale`` (static activation quantization) is read by both kernels in place of the rows' amax; the
quantization kernel then writes it as every row's scale, which is what ``torch._scaled_mm``'s row-wise scaling takes.
"""

from __future__ import annotations

import functools

import torch

from treadle_ir import ops
from treadle_ir.ops.fp8 import FP8_DTYPE

from .. import envs
from .support import check_tensor, row_count, rows_view, triton_supported

__all__ = ["MAX_ROWS", "register", "scaled_mm_linear"]

MAX_ROWS = 16  # the kernel's tl.dot tile; beyond, _scaled_mm
DEFAULT_ROWS = 1  # its 2-16 row variant is slower than _scaled_mm on an H200 (see above)
BLOCK_K_QUANT = 1024


@functools.cache
def _max_rows() -> int:
    return envs.FP8_LINEAR_MAX_ROWS(MAX_ROWS, DEFAULT_ROWS)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = rows_view(x)
    assert x2 is not None, "x must be viewable as [rows, k] without a copy"
    return x2


def quantize_fp8_rows(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import fp8_linear_kernels

    x2 = _as_rows(x)
    rows, k = x2.shape
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows and k:
        block_k = min(BLOCK_K_QUANT, max(16, 1 << (k - 1).bit_length()))
        given = input_scale if input_scale is not None else scale
        fp8_linear_kernels.quantize_fp8_rows_kernel[(rows,)](
            x2, x2.stride(0), q, scale, given, k, STATIC=input_scale is not None, BLOCK_K=block_k,
            HW_CVT=x.is_cuda, num_warps=4,
        )  # fmt: skip
    lead = x.shape[:-1]
    return q.view(*lead, k), scale.view(*lead, 1)


def _kernel_config(num_rows: int, n: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_N, BLOCK_K, num_warps). One row streams 8 x 2048 fp8 tiles (16 KB, the bf16 kernel's tile
    bytes): within 1.2 % of the best of 18 tiles (BLOCK_N 4-16, BLOCK_K 1024-4096, 4 or 8 warps) on each Llama-8B
    projection (H200, benchmarks/fp8_gemv_sweep.py, results/gpu-fp8-lora-h200-bd50d08/call4). The 16-row tiles
    run only with TREADLE_FP8_LINEAR_MAX_ROWS > 1 and are slower than torch._scaled_mm there."""
    if num_rows == 1:
        return 1, 8, 2048, 4
    return 16, 32, 256, 4


def _small_m(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
) -> torch.Tensor:
    from . import fp8_linear_kernels

    x2 = _as_rows(x)
    num_rows, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows and n:
        rows, block_n, block_k, warps = _kernel_config(num_rows, n)
        if not x.is_cuda:  # the interpreter: small tiles keep it fast and exercise partial tiles
            block_n, block_k = min(block_n, 16), min(block_k, 64)
        fp8_linear_kernels.fp8_small_m_linear_kernel[(-(-n // block_n),)](
            x2, x2.stride(0), weight, weight_scale, bias if bias is not None else weight_scale,
            input_scale if input_scale is not None else weight_scale, out, out.stride(0), num_rows, n, k,
            HAS_BIAS=bias is not None, STATIC=input_scale is not None, ROWS=rows, BLOCK_N=block_n,
            BLOCK_K=block_k, UPCAST=not x.is_cuda, num_warps=warps,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)


def scaled_mm_linear(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``torch._scaled_mm`` on quantized rows q [M, k] (scale [M, 1]) and the weight [n, k] (weight_scale [n]):
    bf16 [M, n]; the bias goes into the matmul's epilogue, so the output is rounded once, as the spec's (adding it
    to the bf16 result rounds twice: 0.25 % relative error against the spec's 0.2 % bound, H200 call 2)."""
    return torch._scaled_mm(
        q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), bias=bias, out_dtype=torch.bfloat16
    )


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _scaled_mm_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if not x.is_cuda:
        return "torch._scaled_mm runs on CUDA here"
    if _capability(x.device.index or 0) < (9, 0):
        return "row-wise torch._scaled_mm needs compute capability >= 9.0"
    if x.dtype != torch.bfloat16:
        return f"row-wise torch._scaled_mm returns bf16 only; x is {x.dtype}"
    n, k = weight.shape
    if k % 16 or n % 16:
        return f"torch._scaled_mm needs k and n multiples of 16, the weight is [{n}, {k}]"
    return None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    num_rows = row_count(x)
    if num_rows <= _max_rows():
        return _small_m(x, weight, weight_scale, bias, input_scale)
    if _scaled_mm_reason(x, weight) is not None:
        return ops.fp8_linear.native(x, weight, weight_scale, bias, input_scale)
    x2 = _as_rows(x)
    q, scale = ops.quantize_fp8_rows(x2, input_scale)
    out = scaled_mm_linear(q, scale, weight, weight_scale, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _check_quantize(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> bool | str:
    if (reason := check_tensor(x, "x")) is not None:
        return reason
    if x.dim() == 0 or rows_view(x) is None:
        return "x must be viewable as [rows, features] without a copy"
    if input_scale is not None:
        if (reason := check_tensor(input_scale, "input_scale", frozenset({torch.float32}))) is not None:
            return reason
        if input_scale.shape != (1,) or input_scale.device != x.device:
            return f"input_scale {tuple(input_scale.shape)} must be [1] (one per tensor) on x's device"
    return True


def _check_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> bool | str:
    if (verdict := _check_quantize(x, input_scale)) is not True:
        return verdict
    n = weight.shape[0] if weight.dim() else 0
    for name, t, dtypes in (
        ("weight", weight, frozenset({FP8_DTYPE})),
        ("weight_scale", weight_scale, frozenset({torch.float32})),
        *((("bias", bias, frozenset({x.dtype})),) if bias is not None else ()),
    ):
        if (reason := check_tensor(t, name, dtypes)) is not None:
            return reason
    if weight.dim() != 2 or not weight.is_contiguous() or weight.shape[1] != x.shape[-1]:
        return f"weight {tuple(weight.shape)} must be contiguous [out, {x.shape[-1]}]"
    if weight_scale.shape != (n,):
        return f"weight_scale {tuple(weight_scale.shape)} must be [{n}] (one per output channel)"
    if bias is not None and bias.shape != (n,):
        return f"bias {tuple(bias.shape)} must be [{n}]"
    return True


def register(provider: str = "triton") -> None:
    """Register the fp8 providers under ``provider``."""
    ops.quantize_fp8_rows.register_impl(
        provider, supported=triton_supported, supports_args=_check_quantize, batch_invariant=True
    )(quantize_fp8_rows)
    ops.fp8_linear.register_impl(provider, supported=triton_supported, supports_args=_check_linear)(
        fp8_linear
    )
