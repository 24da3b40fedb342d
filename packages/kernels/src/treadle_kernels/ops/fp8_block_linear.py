"""Triton providers of the block-wise fp8 ops: ``quantize_fp8_groups`` and ``fp8_block_linear`` (``triton``).

``fp8_block_linear`` picks a kernel of :mod:`.fp8_block_kernels` by the number of rows M:
- M = 1 (a batch-1 decode step): the weight-streaming kernel, activations quantized on the fly, one launch;
- M <= ``FUSED_MAX_ROWS``: the block-scaled GEMM quantizing the activations itself (QUANT_A), one launch; each
  program re-quantizes its rows' groups, which costs little next to its weight tiles while M is small;
- larger M (prefill): the group quantization kernel, then the GEMM on its fp8 output.
Tiles (``kernel_config``): BLOCK_K is block_k (one K block a step, the scales applied per step); BLOCK_M follows M
(16 up to 16 rows ... 128 beyond 64); BLOCK_N is 128 for large M and, for small M, the largest of 128 / 64 / 32 that
still gives every SM a program (a decode-sized GEMM is weight-read bound and needs the parallelism). These are first
choices, not measured ones: benchmarks/fp8_block_gemm.py times them against the bf16 and per-channel fp8 paths and
(``--sweep``) against a grid of alternatives.
Requirements: a CUDA GPU with fp8 (compute capability >= 8.9), or the interpreter; block_k at most
``MAX_BLOCK_K``. Anything else runs the spec (``fp8_block_linear.native``: the weight dequantized to fp32 per call).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from treadle_ir import ops
from treadle_ir.ops.fp8 import FP8_DTYPE
from treadle_ir.ops.fp8_block import num_blocks

from .support import check_tensor, next_pow2, num_sms, rows_view, triton_supported

__all__ = [
    "FUSED_MAX_ROWS",
    "MAX_BLOCK_K",
    "GemmConfig",
    "GemvConfig",
    "kernel_config",
    "register",
    "run_block_linear",
]

FUSED_MAX_ROWS = 64
MAX_BLOCK_K = 256  # one K block a step: BLOCK_K = block_k (padded to a power of two)


class GemvConfig(NamedTuple):
    """The one-row kernel's tiles."""

    block_n: int  # outputs per program
    groups: int  # K blocks per step
    num_warps: int


class GemmConfig(NamedTuple):
    """The block-scaled GEMM's tiles (BLOCK_K is block_k) and where its activations are quantized."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int  # row tiles per program group (L2 reuse of weight tiles)
    quant_a: bool  # quantize the activations in the GEMM; else the group quantization kernel runs first


def kernel_config(m: int, n: int, device: torch.device) -> GemvConfig | GemmConfig:
    """The kernel and tiles for M rows and n outputs (see the module docstring); small tiles under the interpreter.
    One row streams 8 x 16 K blocks of 128 a step (16 KB of fp8, the per-channel one-row kernel's tile bytes)."""
    cuda = device.type == "cuda"
    if m == 1:
        return GemvConfig(8, 16, 4) if cuda else GemvConfig(8, 2, 4)
    quant_a = m <= FUSED_MAX_ROWS
    if not cuda:
        return GemmConfig(16, 16, 4, 1, 2, quant_a)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 128
    if m <= FUSED_MAX_ROWS:
        tiles_m = num_blocks(m, block_m)
        sms = num_sms(device.index or 0)
        block_n = next((b for b in (128, 64) if tiles_m * num_blocks(n, b) >= sms), 32)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return GemmConfig(block_m, block_n, warps, 3 if block_m == 128 else 4, 8, quant_a)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = rows_view(x)
    assert x2 is not None, "x must be viewable as [rows, k] without a copy"
    return x2


def quantize_fp8_groups(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from . import fp8_block_kernels

    x2 = _as_rows(x)
    rows, k = x2.shape
    groups = num_blocks(k, group_size)
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    if rows and k:
        pad = next_pow2(group_size)
        per_program = max(1, min(next_pow2(groups), 1024 // pad))
        grid = (rows, num_blocks(groups, per_program))
        fp8_block_kernels.quantize_fp8_groups_kernel[grid](
            x2, x2.stride(0), q, scale, k, group_size, groups, GROUPS=per_program, GROUP_PAD=pad,
            HW_CVT=x.is_cuda, num_warps=4,
        )  # fmt: skip
    lead = x.shape[:-1]
    return q.view(*lead, k), scale.view(*lead, groups)


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    x2 = _as_rows(x)
    config = kernel_config(x2.shape[0], weight.shape[0], x.device)
    out = run_block_linear(x2, weight, weight_scale, bias, block_n, block_k, config)
    return out.view(*x.shape[:-1], weight.shape[0])


def run_block_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    config: GemvConfig | GemmConfig,
) -> torch.Tensor:
    """``fp8_block_linear`` of rows x2 [m, k] with the kernel and tiles `config` (benchmarks try others): [m, n]."""
    from . import fp8_block_kernels

    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    num_kb = num_blocks(k, block_k)
    bias_arg = bias if bias is not None else weight_scale
    cuda = x2.is_cuda
    if isinstance(config, GemvConfig):
        assert m == 1, "the one-row kernel takes one row"
        fp8_block_kernels.fp8_block_gemv_kernel[(num_blocks(n, config.block_n),)](
            x2, weight, weight_scale, bias_arg, out, n, k, block_n, block_k, num_kb, HAS_BIAS=bias is not None,
            BLOCK_N=config.block_n, GROUPS=config.groups, GROUP_PAD=next_pow2(block_k), HW_CVT=cuda,
            num_warps=config.num_warps,
        )  # fmt: skip
        return out
    if config.quant_a:
        a, a_row_stride, a_scale = x2, x2.stride(0), weight_scale
    else:
        a, a_scale = quantize_fp8_groups(x2, block_k)
        a_row_stride = k
    block_kp = max(32 if cuda else 16, next_pow2(block_k))  # the fp8 MMA's K is at least 32
    grid = (num_blocks(m, config.block_m) * num_blocks(n, config.block_n),)
    fp8_block_kernels.fp8_block_gemm_kernel[grid](
        a, a_row_stride, a_scale, weight, weight_scale, bias_arg, out, out.stride(0), m, n, k, block_n, block_k,
        num_kb, QUANT_A=config.quant_a, HAS_BIAS=bias is not None, EXACT_K=block_kp == block_k and k % block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_kp, GROUP_M=config.group_m, HW_CVT=cuda,
        UPCAST=not cuda, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _check_groups(x: torch.Tensor, group_size: int) -> bool | str:
    if (reason := check_tensor(x, "x")) is not None:
        return reason
    if x.dim() == 0 or rows_view(x) is None:
        return "x must be viewable as [rows, features] without a copy"
    if x.is_cuda and _capability(x.device.index or 0) < (8, 9):
        return "fp8 conversions need compute capability >= 8.9"
    if not 1 <= group_size <= 1024:
        return f"group_size {group_size} must be from 1 to 1024"
    return True


def _check_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
) -> bool | str:
    if (verdict := _check_groups(x, block_k)) is not True:
        return verdict
    if block_n < 1 or not 1 <= block_k <= MAX_BLOCK_K:
        return f"block ({block_n}, {block_k}): block_n must be >= 1 and block_k from 1 to {MAX_BLOCK_K}"
    for name, t, dtypes in (
        ("weight", weight, frozenset({FP8_DTYPE})),
        ("weight_scale", weight_scale, frozenset({torch.float32})),
        *((("bias", bias, frozenset({x.dtype})),) if bias is not None else ()),
    ):
        if (reason := check_tensor(t, name, dtypes)) is not None:
            return reason
    if weight.dim() != 2 or not weight.is_contiguous() or weight.shape[1] != x.shape[-1]:
        return f"weight {tuple(weight.shape)} must be contiguous [out, {x.shape[-1]}]"
    n, k = weight.shape
    grid = (num_blocks(n, block_n), num_blocks(k, block_k))
    if tuple(weight_scale.shape) != grid or not weight_scale.is_contiguous():
        return f"weight_scale {tuple(weight_scale.shape)} must be contiguous {grid} (one per tile)"
    if bias is not None and bias.shape != (n,):
        return f"bias {tuple(bias.shape)} must be [{n}]"
    return True


def register(provider: str = "triton") -> None:
    """Register the block-wise fp8 providers under ``provider``."""
    ops.quantize_fp8_groups.register_impl(
        provider, supported=triton_supported, supports_args=_check_groups, batch_invariant=True
    )(quantize_fp8_groups)
    ops.fp8_block_linear.register_impl(provider, supported=triton_supported, supports_args=_check_linear)(
        fp8_block_linear
    )
