"""Persistent, software-pipelined one-row linear kernel: an experiment (imported lazily: this module imports triton).

Same math as :func:`.linear_kernels.small_m_linear_kernel` at ``ROWS == 1``: ``out[n] = sum_k a[k] * weight[n, k]
(+ bias[n])`` with ``a`` the prologue applied to the input on the fly (0 plain, 1 add + rms_norm, 2 silu_and_mul,
3 gelu_tanh_and_mul), rounded as there (the prologue is that module's ``_input_tile``). Accumulation is fp32.

Why: that kernel runs one program per BLOCK_N outputs (512-768 programs of 64 KB on 132 SMs for the 4096-6144
output projections); every program issues its loads at once, so each wave ramps up and the last one runs part
empty, ~3-5 us of a 10-16 us projection on an H200. Here a fixed grid of NUM_PROGRAMS programs (a multiple of
the SM count) walks output tiles pid, pid + NUM_PROGRAMS, ...; the (output tile, k tile) pairs of a program are
ONE loop, ``tl.range(..., num_stages=NUM_STAGES)``, so Triton's pipeliner (which pipelines loads that feed no dot
only in loops carrying that attribute) keeps the next NUM_STAGES - 1 weight tiles in flight across tile
boundaries. A tile's accumulator is stored (masked) after its last k tile, and reset.
PROLOGUE 1: each program first makes one pass over x + residual (one row, from L2) for its inverse RMS; program 0
also stores x + residual to ``residual_out``.
USE_PDL (programmatic dependent launch; TREADLE_PDL=1): each program requests its first weight tile, lets the next
kernel launch and waits for the kernel ahead before reading any input; that first tile is accumulated outside the
loop. The persistent grid is resident in one wave, so the next kernel's programs take SM slots only as this
kernel's programs finish, and request their first weights in this kernel's tail.

Measured against: the production one-row config of ``small_m_linear_kernel`` (``linear._config``) on
Llama-3.1-8B's projections, in CUDA graphs with the weight cold in L2 (benchmarks/gemv_stream_sweep.py): faster
alone, slower end to end, so the linear provider dispatches here only with ``TREADLE_STREAM_LINEAR=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear import prepare_launch, shaped
from .linear_kernels import _input_tile, norm_prepass
from .support import pdl_enabled, row_count

__all__ = ["launch_stream", "stream_linear_kernel"]


@triton.jit(do_not_specialize=["NUM_PROGRAMS"])  # one compile for every grid size
def stream_linear_kernel(
    x_ptr,
    x_row_stride,
    residual_ptr,
    residual_row_stride,
    norm_weight_ptr,
    residual_out_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    out_row_stride,
    num_rows,
    n,
    k,
    epsilon,
    NUM_PROGRAMS,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    PEEL: tl.constexpr = False,  # the first weight tile loaded before the loop (USE_PDL: before the wait)
):
    dtype = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = tl.arange(0, 1)  # the one row (masked off when num_rows is 0)
    row_mask = rows < num_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
    r_rows = residual_ptr + rows.to(tl.int64)[:, None] * residual_row_stride
    num_k_tiles = tl.cdiv(k, BLOCK_K)
    num_n_tiles = tl.cdiv(n, BLOCK_N)
    # this program's tiles: pid, pid + NUM_PROGRAMS, ... below num_n_tiles (none when pid >= num_n_tiles)
    num_my_tiles = (num_n_tiles - pid + NUM_PROGRAMS - 1) // NUM_PROGRAMS
    tile_n, tile_k = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    start = 0
    if PEEL:  # the first weight tile, independent of the kernel ahead
        offs_first = pid * BLOCK_N + tile_n
        w_first = tl.load(weight_ptr + offs_first.to(tl.int64)[:, None] * k + tile_k[None, :],
                          mask=(offs_first < n)[:, None] & (tile_k < k)[None, :], other=0.0)  # fmt: skip
    if USE_PDL:  # let the next kernel launch; wait for the kernel ahead before reading any input
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    inv_rms = tl.zeros([1], dtype=tl.float32)
    if PROLOGUE == 1:
        inv_rms = norm_prepass(x_rows, r_rows, residual_out_ptr, k, rows, row_mask, epsilon, pid, 1, BLOCK_K,
                               dtype)  # fmt: skip
    if PEEL:  # that first tile, then the loop over the rest
        if num_my_tiles > 0:
            a = _input_tile(x_rows, r_rows, norm_weight_ptr, tile_k, k, row_mask, inv_rms, PROLOGUE, dtype)
            acc = _step(acc, a, w_first, 0, num_k_tiles, pid, out_ptr, out_row_stride, bias_ptr, n, rows,
                        row_mask, HAS_BIAS, BLOCK_N, dtype)  # fmt: skip
        start = 1
    for i in tl.range(start, num_my_tiles * num_k_tiles, num_stages=NUM_STAGES):
        t = i // num_k_tiles
        k_tile = i - t * num_k_tiles
        tile = pid + t * NUM_PROGRAMS
        offs_n = tile * BLOCK_N + tile_n
        cols = k_tile * BLOCK_K + tile_k
        w_mask = (offs_n < n)[:, None] & (cols < k)[None, :]
        w = tl.load(weight_ptr + offs_n.to(tl.int64)[:, None] * k + cols[None, :], mask=w_mask, other=0.0)
        a = _input_tile(x_rows, r_rows, norm_weight_ptr, cols, k, row_mask, inv_rms, PROLOGUE, dtype)
        acc = _step(acc, a, w, k_tile, num_k_tiles, tile, out_ptr, out_row_stride, bias_ptr, n, rows, row_mask,
                    HAS_BIAS, BLOCK_N, dtype)  # fmt: skip


@triton.jit
def _step(acc, a, w, k_tile, num_k_tiles, tile, out_ptr, out_row_stride, bias_ptr, n, rows, row_mask,
          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, dtype):  # fmt: skip
    """acc += a . w over one k tile; after output tile ``tile``'s last k tile, store it and return zeros."""
    acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    if k_tile == num_k_tiles - 1:  # the tile is done: store it and start the next one from zero
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
        tl.store(out, acc.to(dtype), mask=row_mask[:, None] & n_mask[None, :])
        acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    return acc


def launch_stream(
    prologue: int,
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    num_programs: int,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    epsilon: float = 0.0,
    peel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel on x's one row; returns (out [..., n], residual_out [..., k] for the norm prologue).

    Arguments as ``linear._launch``, with the tiles spelled out and ``num_programs`` the persistent grid. One row
    reduces with a multiply and a row sum (no ``tl.dot``), so there is nothing to upcast for the interpreter.
    ``peel`` (default: with PDL) loads the first weight tile before the loop; tests set it without PDL."""
    if (rows := row_count(x)) > 1:
        raise ValueError(
            f"launch_stream takes one row, x has {rows}: the kernel would compute only the first; "
            "use linear._launch for several rows"
        )
    if num_programs < 1:
        raise ValueError(f"num_programs ({num_programs}) must be at least 1, e.g. the device's SM count")
    out, residual_out, args = prepare_launch(x, k, weight, bias, residual, norm_weight, epsilon)
    if args is not None:
        stream_linear_kernel[(num_programs,)](
            *args,
            num_programs,
            PROLOGUE=prologue,
            HAS_BIAS=bias is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            NUM_STAGES=num_stages,
            USE_PDL=(pdl := pdl_enabled(x.device)),
            PEEL=pdl if peel is None else peel,
            num_warps=num_warps,
            num_stages=num_stages,
            **({"launch_pdl": True} if pdl else {}),
        )
    return shaped(x, out, residual_out)
