"""fp8 (e4m3) quantization with one scale per row, and the linear layer that runs on it: ``fp8_linear``.

fp8 projections (``quantization="fp8"``, or an fp8 checkpoint) store each weight [n, k] as float8_e4m3fn with one
fp32 scale per output channel (row) and quantize the activations one scale per token (row), so the matmul can run
on fp8 tensor cores. Both are :func:`quantize_fp8_rows`: a row's scale is ``amax / 448`` (448 is e4m3's largest
finite value; an all-zero row gets scale 1), and its values are ``x * (1 / scale)`` (the reciprocal rounded to fp32
first, then the product, each to nearest: as cheap as a multiply in a kernel, where a division per value is not),
clamped to [-448, 448] and rounded to nearest-even e4m3.
Static activation quantization (checkpoints calibrated with one activation scale per projection): ``input_scale``
[1] fp32 is given, and every row is quantized with it the same way (values beyond 448 * input_scale saturate);
``input_scale`` None is the dynamic per-row scale above.

Numerics of ``fp8_linear`` (what every provider matches, up to the fp32 summation order):
``acc = q_x @ q_w^T`` with the e4m3 values widened to fp32 (each product is exact), then
``(acc * s_x) * s_w + bias`` in fp32, rounded once to x's dtype. A provider may not skip the activation
quantization: a token's output must not depend on which kernel its batch size picked.
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = ["FP8_DTYPE", "FP8_MAX", "fp8_linear", "quantize_fp8_rows", "quantize_with_scale", "row_scale"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def row_scale(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 scale of rows whose largest magnitude is ``amax``: amax / 448, or 1 for an all-zero row."""
    amax = amax.float()
    # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, which is not amax / 448
    return torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 / scale)`` clamped to e4m3's range and rounded to float8_e4m3fn (scale broadcast over x's rows)."""
    return (x.float() * torch.reciprocal(scale.float())).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _example_quant(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
    return (torch.randn(8, 4096, device=device, dtype=dtype),)  # [num_tokens, hidden]


def _example_linear(device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    x = torch.randn(1, 4096, device=device, dtype=dtype)  # one decode token
    weight = torch.empty(4096, 4096, device=device, dtype=FP8_DTYPE)  # the report needs shapes only
    return x, weight, torch.ones(4096, device=device), None


@op(example=_example_quant)
def quantize_fp8_rows(
    x: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., k] -> (q [..., k] float8_e4m3fn, scale [..., 1] fp32) with x ~= q * scale, one scale per row:
    each row's own (input_scale None) or the given input_scale [1] fp32 for every row (static)."""
    if input_scale is None:
        scale = row_scale(x.float().abs().amax(dim=-1, keepdim=True))
    else:
        scale = input_scale.float().reshape(1).expand(*x.shape[:-1], 1).clone()
    return quantize_with_scale(x, scale), scale


@op(example=_example_linear)
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (weight * weight_scale)^T + bias`` with x quantized to e4m3 per row first: x [..., k] (float);
    weight [n, k] float8_e4m3fn; weight_scale [n] fp32 (one per output channel); bias [n] or None;
    input_scale [1] fp32 (static: x quantized with it) or None (dynamic: each row's own scale).
    Result [..., n] in x's dtype."""
    q, scale = quantize_fp8_rows.native(x, input_scale)
    acc = torch.matmul(q.float(), weight.float().t())
    y = acc * scale * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
