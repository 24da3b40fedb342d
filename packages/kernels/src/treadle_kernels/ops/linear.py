"""Triton providers for the fused linear ops: ``linear``, ``add_rms_norm_linear``, ``*_and_mul_linear``.

:mod:`.linear_kernels` streams the weight once with the norm or gated activation applied to the input on the fly,
for up to ``TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS`` rows (default 1, a batch-1 decode step; 0 turns it off; at most
``MAX_ROWS``). With ``TREADLE_STREAM_LINEAR=1`` (off by default), one-row projections with fewer than
``STREAM_MAX_N`` outputs run :mod:`.linear_stream_kernels` instead (persistent programs, loads pipelined across
tiles). ``_config`` picks it only where it measured faster than the unfused path, which runs otherwise: the
standalone prologue op (itself dispatched: the Triton norm or activation kernel on GPU) then cuBLAS ``F.linear``.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

from treadle_ir import ops

from .. import envs
from .linear_checks import LinearChecks, register_linear_ops
from .support import check_tensor, num_sms, pdl_enabled, row_count, rows_view, triton_supported

__all__ = ["MAX_ROWS", "register"]

MAX_ROWS = 16  # beyond this a step's matmuls stop being weight-read bound


@functools.cache
def _max_rows() -> int:
    return envs.SMALL_BATCH_LINEAR_MAX_ROWS(MAX_ROWS)


_PLAIN, _NORM, _SILU, _GELU_TANH = 0, 1, 2, 3


class Config(NamedTuple):
    rows: int  # padded row count: 1 (multiply and row sum) or 16 (tl.dot)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 0  # > 0: the persistent stream kernel (one row) on this many programs per SM
    maxnreg: int = 0  # > 0: registers per thread capped at this (ptxas), so more programs share an SM


STREAM_MAX_N = 65536  # the lm_head (128k outputs) streams at 4.6 TB/s with one program per tile already


def _config(prologue: int, num_rows: int, n: int, k: int) -> Config | None:
    """The kernel's tiles where it beats the unfused path, else None (unfused: norm / activation kernel + cuBLAS).

    Measured on an H200 inside CUDA graphs (results/gemv-sweep-h200-*.json). One row: every projection of
    Llama-3.1-8B is as fast or faster fused (o_proj 10.8 against 12.5 us, qkv + norm 16.7 against 17.3, down +
    SiLU 31.3 against 32.0, lm_head 228 against 239; gate_up + norm ties). 2-16 rows: only the plain projection
    wins (o_proj 11.6 against 12.4 us); the norm and gated prologues are slower there than the launches they
    replace. By default only one row (TREADLE_SMALL_BATCH_LINEAR_MAX_ROWS=1): batch-1 decode went from 5.21 to 4.65
    ms per token with the kernel (H200, same call), while each tile shape costs one Triton compile (about a
    second) at a cold start, and 2-16 rows gain only ~1 us per o_proj.
    The persistent stream kernel at 2 programs per SM beat those one-row tiles on H200
    (results/gpu-piecewise-h200-3ea134f/gemv_stream.json): qkv + norm 15.84 against 16.22 us, o_proj 10.55 against
    10.83, gate_up + norm 57.11 against 57.42, down + SiLU 29.89 against 30.86; it lost on lm_head (230.8 against
    227.9). End to end it was slower (4.43 / 4.45 against 4.41 / 4.40 ms per token, results/gpu-stream-h200-815d627),
    so it runs only with TREADLE_STREAM_LINEAR=1.
    Register caps (``maxnreg``) change how many programs share an SM, and on the GPU image's Triton 3.6 they
    mattered more than the tiles (results/gpu-regcap-h200-3570cf7, one-row times): o_proj (4, 2048, 4 warps, cap
    128) 9.85 against 10.77 us for the previous (8, 4096, 8 warps); gate_up + norm (8, 4096, 8 warps, cap 64) 56.7
    against 57.6; down + SiLU (cap 96) 29.2 against 31.6; lm_head (4, 4096, 4 warps, cap 96) 226.6 against 227.8;
    qkv + norm (8, 2048, 4 warps, cap 72) 16.0 against 16.2-16.7 alone. Batch-1 decode of Llama-3.1-8B: 4.198-4.232
    against 4.312-4.371 ms per token on two machines, 4.24-4.34 against 4.38-4.40 on a third (alternating
    processes); qkv's cap, measured last, 4.190-4.193 against 4.208-4.213 (with one-request prefill graphs, same
    machine). Another Triton allocates registers its own way, so the caps are tuned for that one."""
    if num_rows > _max_rows():
        return None
    if num_rows == 1:
        if n < STREAM_MAX_N and envs.STREAM_LINEAR():
            return Config(1, 8 if prologue in (_SILU, _GELU_TANH) else 4, 2048, 4, 3, programs_per_sm=2)
        if prologue == _PLAIN:
            if n >= STREAM_MAX_N:  # an lm_head
                return Config(1, 4, 4096, 4, 3, maxnreg=96)
            return Config(1, 4, 2048, 4, 3, maxnreg=128)
        if prologue == _NORM:  # a wide gate_up, else qkv
            return Config(1, 8, 4096, 8, 3, maxnreg=64) if n > 16384 else Config(1, 8, 2048, 4, 3, maxnreg=72)
        return Config(1, 8, 2048, 8, 1, maxnreg=96 if prologue == _SILU else 0)  # GELU: not timed under a cap
    if prologue == _PLAIN:
        return Config(16, 32, 256, 4, 4) if n <= 8192 else Config(16, 64, 128, 4, 4)
    return None


def _launch(
    prologue: int,
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: Config,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel on x's rows; returns (out [..., n], residual_out [..., k] for the norm prologue)."""
    from . import linear_kernels

    if cfg.programs_per_sm:
        from .linear_stream_kernels import launch_stream

        sms = num_sms(x.device.index or 0) if x.is_cuda else 4  # CPU: the interpreter
        return launch_stream(prologue, x, k, weight, bias, cfg.block_n, cfg.block_k, cfg.num_warps,
                             cfg.num_stages, cfg.programs_per_sm * sms, residual, norm_weight, epsilon)  # fmt: skip

    out, residual_out, args = prepare_launch(x, k, weight, bias, residual, norm_weight, epsilon)
    if args is not None:
        linear_kernels.small_m_linear_kernel[(-(-weight.shape[0] // cfg.block_n),)](
            *args,
            PROLOGUE=prologue,
            HAS_BIAS=bias is not None,
            ROWS=cfg.rows,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            UPCAST=x.device.type == "cpu",  # CPU means the interpreter
            USE_PDL=(pdl := cfg.rows == 1 and pdl_enabled(x.device)),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **({"launch_pdl": True} if pdl else {}),
            # the caps were tuned without PDL, whose first tile held across the wait needs more registers: under
            # a cap it spilled (batch-1 decode 17.4 against 4.14 ms per token, results/gpu-pdl-cap-h200-381f3dc)
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and x.is_cuda and not pdl else {}),
        )
    return shaped(x, out, residual_out)


def prepare_launch(
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
    """The outputs (out [rows, n]; residual_out [rows, k] for the norm prologue) and the arguments both one-row
    kernels take first (x ... epsilon), or None when there is nothing to compute."""
    x2 = rows_view(x)
    assert x2 is not None, "x must be viewable as [rows, k] without a copy"
    num_rows, n = x2.shape[0], weight.shape[0]
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.empty((num_rows, k), dtype=x.dtype, device=x.device)
    if num_rows == 0 or n == 0:
        return out, residual_out, None
    r2 = rows_view(residual) if residual is not None else x2
    assert r2 is not None, "residual must be viewable as [rows, k] without a copy"
    args = (
        x2, x2.stride(0), r2, r2.stride(0),
        norm_weight if norm_weight is not None else weight, residual_out if residual_out is not None else out,
        weight, bias if bias is not None else weight, out, out.stride(0), num_rows, n, k, epsilon,
    )  # fmt: skip
    return out, residual_out, args


def shaped(
    x: torch.Tensor, out: torch.Tensor, residual_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out and residual_out with x's leading dims."""
    lead = x.shape[:-1]
    return out.view(*lead, out.shape[-1]), None if residual_out is None else residual_out.view(
        *lead, x.shape[-1]
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    if (cfg := _config(_PLAIN, row_count(x), weight.shape[0], k)) is None:
        return F.linear(x, weight, bias)
    return _launch(_PLAIN, x, k, weight, bias, cfg)[0]


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    epsilon: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    if (cfg := _config(_NORM, row_count(x), weight.shape[0], k)) is None:
        normed, residual_out = ops.fused_add_rms_norm(x, residual, norm_weight, epsilon)
        return F.linear(normed, weight, bias), residual_out
    out, residual_out = _launch(_NORM, x, k, weight, bias, cfg, residual, norm_weight, epsilon)
    assert residual_out is not None
    return out, residual_out


def _gated_linear(
    prologue: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    k = x.shape[-1] // 2
    if (cfg := _config(prologue, row_count(x), weight.shape[0], k)) is None:
        act = ops.silu_and_mul if prologue == _SILU else ops.gelu_tanh_and_mul
        return F.linear(act(x), weight, bias)
    return _launch(prologue, x, k, weight, bias, cfg)[0]


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _gated_linear(_SILU, x, weight, bias)


def gelu_tanh_and_mul_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _gated_linear(_GELU_TANH, x, weight, bias)


def register(provider: str = "triton") -> None:
    """Register the fused linear providers under ``provider``."""
    register_linear_ops(provider, sys.modules[__name__], triton_supported, LinearChecks(check_tensor))
