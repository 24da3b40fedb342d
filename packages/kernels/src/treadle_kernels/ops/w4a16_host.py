"""The ``cpu`` provider of ``w4a16_linear``: dequantize per call, a slice of output columns at a time, and multiply in
x's dtype.

Nothing is cached: a dequantized copy kept per projection would hold more memory than the unquantized model (it sits
next to the 4-bit weights), which is the memory 4-bit checkpoints exist to save. Each call unpacks at most
``CHUNK_BYTES`` (64 MiB) of weight in x's dtype at a time (Llama-3.1-8B's 28672 x 4096 gate_up in bf16 takes four
slices), multiplies x by it (oneDNN's bf16 GEMM for bf16 rows) and writes those output columns. The native spec does
the same math in fp32 on the whole weight at once; in fp32 the two differ only by the matmul's summation order, in
bf16 by the weight's rounding to bf16 (the integers are exact, the scale multiply is rounded once).
"""

from __future__ import annotations

import torch

from treadle_ir import Platform, ops
from treadle_ir.ops.int4 import dequantize_int4

from .w4a16_linear import layout_reason

__all__ = ["CHUNK_BYTES", "register"]

CHUNK_BYTES = 64 << 20


def supported(platform: Platform) -> bool | str:
    return True if platform.is_cpu else "host memory only (the Triton provider serves CUDA tensors)"


def w4a16_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    k, n = x.shape[-1], packed_weight.shape[1]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    columns = max(1, CHUNK_BYTES // max(1, k * 4))  # the fp32 dequantization is the largest temporary
    for c0 in range(0, n, columns):
        cols = slice(c0, min(n, c0 + columns))
        zeros_part = zeros[:, cols] if zeros is not None else None
        weight = dequantize_int4(packed_weight[:, cols], scales[:, cols], zeros_part, g_idx, group_size)
        y = torch.matmul(x, weight.to(x.dtype))  # [..., columns]
        out[..., cols] = y if bias is None else y + bias[cols]
    return out


def _check(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> bool | str:
    if x.device.type != "cpu":
        return f"x is on {x.device}; this provider serves host tensors"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"x dtype {x.dtype}: fp32 and bf16 rows only (fp16 matmuls are slow on CPUs)"
    return layout_reason(x, packed_weight, scales, zeros, g_idx, bias, group_size) or True


def register(provider: str = "cpu") -> None:
    """Register under ``provider`` (the CPU platform's default list has ``cpu`` after ``onednn``)."""
    ops.w4a16_linear.register_impl(provider, supported=supported, supports_args=_check)(w4a16_linear)
