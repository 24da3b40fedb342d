"""The Triton provider of ``w4a16_linear`` (``triton``): 4-bit weights unpacked in registers before a 16-bit dot.

Up to ``gemv_max_rows()`` rows (default 2, ``TREADLE_W4A16_GEMV_MAX_ROWS``; 0: never) a GEMV on fp32 FMAs runs
instead (:mod:`.w4a16_gemv`: no padding of the rows to a 16-row tensor-core tile, the weight streamed once); then
one kernel (:mod:`.w4a16_linear_kernels`) for every row count; ``choose_config`` picks its tiles by the rows:
- up to 16 rows (decode): one 16-row tile, 64 columns by 128 input rows per step, and the K dimension split so that
  about ``PROGRAMS_PER_SM`` programs per SM stream the weight (a 4096-column projection has only 64 column tiles);
  the fp32 partials are summed in order by a second small kernel (deterministic, unlike atomics);
- up to 64 rows: 64-row tiles, split likewise while the output tiles are too few;
- more rows (prefill): 64 x 128 tiles up to 256 rows, then 128 x 128, 64 input rows per step, K split only while
  the output tiles do not fill the SMs once (a 4096-column projection at 128 rows has 32 tiles).
A step's input rows stay inside one group (BLOCK_K is capped at group_size, a power of two), so the integer weights go
to the dot exact and the scale multiplies each group's partial sum; act-order checkpoints (``g_idx``), and group sizes
a step cannot divide, gather each row's scale and zero point instead (the slower PER_ROW path). vLLM reorders an
act-order weight's rows by g_idx at load and permutes each call's activations to match (Marlin); keeping g_idx here
needs no activation permutation and works on a row-parallel rank, whose slice of the rows references any group.
From ``dequant_min_rows()`` rows on (default 128, ``TREADLE_W4A16_DEQUANT_MIN_ROWS``) the weight is instead
dequantized once per call into a [k, n] scratch of x's dtype (``w4a16_dequant_kernel``: one read of the 4-bit words,
one 16-bit write) and multiplied by cuBLAS (``torch.addmm``), as vLLM's AWQ does from 256 tokens: a compute-bound
GEMM then runs at the 16-bit rate, and the dequantization (~2.5 bytes a weight) costs less than unpacking inside
every output tile's K loop. The scratch is transient (the largest projection's [k, n], e.g. 235 MB for Llama-8B's
gate_up in bf16); the weight is rounded to x's dtype once, as the PER_ROW path rounds its tiles.
The tiles are starting points, not measurements: ``benchmarks/w4a16_gemm.py`` times them and alternatives on an H200.
Under the CPU interpreter (tests) the same kernel runs on small tiles with fp32 dots.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import NamedTuple

import torch

from treadle_ir import ops
from treadle_ir.ops.int4 import INT4_PACK

from .. import envs
from .support import FLOAT_DTYPES, check_tensor, num_sms, row_count, rows_view, triton_supported

__all__ = [
    "Config",
    "choose_config",
    "dequant_matmul",
    "dequant_min_rows",
    "dequantize",
    "gemv_max_rows",
    "launch",
    "layout_reason",
    "register",
]

PROGRAMS_PER_SM = 4  # split-K target for few rows: enough programs in flight to keep HBM busy
_INTERPRETER_SMS = 2


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # input rows per step (a multiple of 8: whole int32 words)
    split_k: int  # programs sharing one output tile's K dimension (fp32 partials, then a reduction)
    num_warps: int
    num_stages: int
    expand: int = 1  # 1: unpack each loaded word into its 8 rows; 0: load the word of every row
    group_m: int = 8  # row tiles walked together (weight tiles shared through L2)


def choose_config(num_rows: int, n: int, k: int, group_size: int, sms: int, on_gpu: bool = True) -> Config:
    """The production tiles for num_rows x [k -> n] (see the module docstring); `sms`: the device's SMs."""
    if num_rows <= 16:
        cfg = Config(16, 64, 128, 1, 4, 4)
    elif num_rows <= 64:
        cfg = Config(64, 64, 128, 1, 4, 4)
    elif num_rows <= 256:
        cfg = Config(64, 128, 64, 1, 4, 3)
    else:
        cfg = Config(128, 128, 64, 1, 8, 3)
    if not on_gpu:  # the interpreter: small tiles run fast and leave partial tiles to check
        cfg = cfg._replace(block_m=16, block_n=min(cfg.block_n, 32), block_k=64)
    if group_size < k and group_size % 16 == 0 and group_size & (group_size - 1) == 0:
        cfg = cfg._replace(block_k=min(cfg.block_k, group_size))  # one group per step
    steps = -(-k // cfg.block_k)
    tiles = -(-num_rows // cfg.block_m) * -(-n // cfg.block_n)
    target = PROGRAMS_PER_SM * sms if num_rows <= 64 else sms  # few rows stream; more rows fill one wave
    if tiles < target:
        cfg = cfg._replace(split_k=max(1, min(steps, target // tiles)))
    return cfg


def _per_row(group_size: int, k: int, g_idx: torch.Tensor | None, block_k: int) -> bool:
    """Whether steps must gather each row's scale (act order, or a step straddling groups)."""
    return g_idx is not None or not (group_size >= k or group_size % block_k == 0)


def launch(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    cfg: Config,
) -> torch.Tensor:
    """Run the kernel with tiles `cfg` (benchmarks and tests pass their own)."""
    from . import w4a16_linear_kernels as kernels

    def run(x2: torch.Tensor, parts: torch.Tensor, per_split: int, split: int) -> None:
        m, k = x2.shape
        n = parts.shape[-1]
        upcast = not x.is_cuda or x.dtype == torch.float32
        grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n), split)
        kernels.w4a16_gemm_kernel[grid](
            x2, x2.stride(0), packed_weight, scales, zeros if zeros is not None else packed_weight,
            g_idx if g_idx is not None else packed_weight, bias if bias is not None else scales, parts, m, n, k,
            group_size, per_split, HAS_ZEROS=zeros is not None, PER_ROW=_per_row(group_size, k, g_idx, cfg.block_k),
            G_IDX=g_idx is not None, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, PARTIALS=split > 1, GROUP_M=cfg.group_m, EXPAND=cfg.expand, UPCAST=upcast,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    return split_k_launch(x, packed_weight.shape[1], bias, cfg.block_k, cfg.split_k, run)


def split_k_launch(
    x: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    block_k: int,
    split_k: int,
    run: Callable[[torch.Tensor, torch.Tensor, int, int], None],
) -> torch.Tensor:
    """The frame of both 4-bit kernels' launches (this GEMM's, w4a16_gemv.py's): x as [m, k] rows, the output,
    K's steps of `block_k` cut into at most `split_k` non-empty splits; `run(x2, parts, per_split, split)` launches
    the kernel into `parts` (the output itself, or fp32 partials [split, m, n] reduced here in split order, the
    bias added once)."""
    from .w4a16_linear_kernels import w4a16_reduce_kernel

    x2 = rows_view(x)
    assert x2 is not None, "x must be viewable as [rows, k] without a copy"
    m, k = x2.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    steps = -(-k // block_k)
    per_split = -(-steps // max(1, min(split_k, steps)))
    split = -(-steps // per_split)  # no empty split
    parts = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    run(x2, parts, per_split, split)
    if split > 1:
        block_n = 256 if x.is_cuda else 32
        w4a16_reduce_kernel[(m, -(-n // block_n))](
            parts, bias if bias is not None else parts, out, m, n, split, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)


@functools.cache
def _sms(device_index: int) -> int:
    return num_sms(device_index)


@functools.cache
def dequant_min_rows() -> int:
    """Rows from which the weight is dequantized and multiplied by cuBLAS (module docstring; read once)."""
    return envs.W4A16_DEQUANT_MIN_ROWS()


@functools.cache
def gemv_max_rows() -> int:
    """Rows up to which the GEMV kernel runs (module docstring; read once)."""
    from .w4a16_gemv import DEFAULT_MAX_ROWS, MAX_ROWS

    return envs.W4A16_GEMV_MAX_ROWS(MAX_ROWS, DEFAULT_MAX_ROWS)


def dequantize(
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dequantized weight [k, n] in `dtype` (``w4a16_dequant_kernel``)."""
    from . import w4a16_linear_kernels as kernels

    k8, n = packed_weight.shape
    out = torch.empty((k8 * INT4_PACK, n), dtype=dtype, device=packed_weight.device)
    block_w, block_n = (16, 128) if packed_weight.is_cuda else (4, 32)
    grid = (-(-k8 // block_w), -(-n // block_n))
    kernels.w4a16_dequant_kernel[grid](
        packed_weight, scales, zeros if zeros is not None else packed_weight,
        g_idx if g_idx is not None else packed_weight, out, n, k8 * INT4_PACK, group_size,
        HAS_ZEROS=zeros is not None, G_IDX=g_idx is not None, BLOCK_W=block_w, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out


def dequant_matmul(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """x @ dequant(W) (+ bias) with the weight dequantized once into x's dtype, then one cuBLAS GEMM."""
    x2 = rows_view(x)
    assert x2 is not None, "x must be viewable as [rows, k] without a copy"
    weight = dequantize(packed_weight, scales, zeros, g_idx, group_size, x.dtype)
    out = torch.mm(x2, weight) if bias is None else torch.addmm(bias, x2, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


def w4a16_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    rows = row_count(x)
    if rows >= dequant_min_rows():
        return dequant_matmul(x, packed_weight, scales, zeros, g_idx, bias, group_size)
    k8, n = packed_weight.shape
    sms = _sms(x.device.index or 0) if x.is_cuda else _INTERPRETER_SMS
    if rows <= gemv_max_rows():
        from .w4a16_gemv import choose_gemv_config, launch_gemv

        gemv = choose_gemv_config(rows, n, k8 * INT4_PACK, group_size, sms, x.is_cuda)
        return launch_gemv(x, packed_weight, scales, zeros, g_idx, bias, group_size, gemv)
    cfg = choose_config(rows, n, k8 * INT4_PACK, group_size, sms, x.is_cuda)
    return launch(x, packed_weight, scales, zeros, g_idx, bias, group_size, cfg)


def layout_reason(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> str | None:
    """None when the arguments are the layout treadle_ir.ops.int4 describes (contiguous, on x's device), else why
    not. Any device: the host provider checks with it too."""
    if x.dim() == 0 or rows_view(x) is None:
        return "x must be viewable as [rows, features] without a copy"
    if x.dtype not in FLOAT_DTYPES or x.stride(-1) != 1:
        return f"x must be a float tensor with unit stride in its last dim, got {x.dtype}"
    k = x.shape[-1]
    if k % INT4_PACK or packed_weight.dim() != 2 or packed_weight.shape[0] != k // INT4_PACK:
        return f"packed_weight {tuple(packed_weight.shape)} must be [{k} / 8, n] (k a multiple of 8)"
    n = packed_weight.shape[1]
    if group_size <= 0:
        return f"group_size must be positive, got {group_size}"
    groups = -(-k // group_size) if g_idx is None else scales.shape[0]
    # (name, tensor, dtypes it may have, shape it must have)
    tensors: list[tuple[str, torch.Tensor, AbstractSet[torch.dtype], tuple[int, ...]]] = [
        ("packed_weight", packed_weight, {torch.int32}, (k // INT4_PACK, n)),
        ("scales", scales, FLOAT_DTYPES, (groups, n)),
    ]
    if zeros is not None:
        tensors.append(("zeros", zeros, {torch.uint8}, (scales.shape[0], n)))
    if g_idx is not None:
        tensors.append(("g_idx", g_idx, {torch.int32}, (k,)))
    if bias is not None:
        tensors.append(("bias", bias, FLOAT_DTYPES, (n,)))
    for name, t, dtypes, shape in tensors:
        if t.dtype not in dtypes:
            return f"{name} dtype {t.dtype} not supported"
        if tuple(t.shape) != shape or not t.is_contiguous() or t.device != x.device:
            return f"{name} {tuple(t.shape)} must be contiguous {list(shape)} on x's device"
    return None


def _check_args(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> bool | str:
    reason = check_tensor(x, "x") or layout_reason(x, packed_weight, scales, zeros, g_idx, bias, group_size)
    return reason or True


def register(provider: str = "triton") -> None:
    """Register the Triton provider of ``w4a16_linear`` under ``provider``."""
    ops.w4a16_linear.register_impl(provider, supported=triton_supported, supports_args=_check_args)(
        w4a16_linear
    )
