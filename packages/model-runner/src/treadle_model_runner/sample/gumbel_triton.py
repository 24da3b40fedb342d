"""Fused Triton kernel for the seeded exponential noise: the hash of gumbel.py in one pass on the GPU.

The torch version in gumbel.py runs ~40 elementwise int64 kernels over [S, V]; this one derives the keys and
writes E = -log U straight into the noise rows of the seeded requests, one read-free pass. Same hash, same
uint32 arithmetic (Triton's uint32 multiply wraps and its shifts are logical), so U is bit-identical to the torch
version; E may differ from torch's log by float rounding only.

Triton is imported lazily: the package imports, and CPU runs use the torch version, without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    from treadle_kernels.ops.gumbel_kernels import fmix32

    @triton.jit
    def seeded_noise_kernel(  # type: ignore[no-untyped-def]
        out_ptr,
        out_stride,
        rows_ptr,
        seed_lo_ptr,
        seed_hi_ptr,
        pos_ptr,
        vocab_size,
        WRITE_UNIFORM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        s = tl.program_id(0)
        row = tl.load(rows_ptr + s)
        pos = tl.load(pos_ptr + s)
        w0 = tl.load(seed_lo_ptr + s).to(tl.uint32)
        w1 = tl.load(seed_hi_ptr + s).to(tl.uint32)
        w2 = pos.to(tl.uint32)  # int64 -> uint32 keeps the low word
        w3 = (pos >> 32).to(tl.uint32)
        k0 = fmix32(tl.full((), 0x9E3779B9, tl.uint32) ^ w0)
        k1 = fmix32(tl.full((), 0x7F4A7C15, tl.uint32) + w0)
        k0 = fmix32(k0 ^ w1)
        k1 = fmix32(k1 + w1)
        k0 = fmix32(k0 ^ w2)
        k1 = fmix32(k1 + w2)
        k0 = fmix32(k0 ^ w3)
        k1 = fmix32(k1 + w3)
        v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = v < vocab_size
        h = fmix32(v.to(tl.uint32) ^ k0)
        h = fmix32(h + k1)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        val = u if WRITE_UNIFORM else -tl.log(u)
        tl.store(out_ptr + row * out_stride + v, val, mask=mask)

    return seeded_noise_kernel


def seeded_noise_triton(
    noise: torch.Tensor,
    rows: torch.Tensor,
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    positions: torch.Tensor,
    write_uniform: bool = False,
) -> None:
    """Write E = -log U (or U itself) into noise[rows] ([B, V] float32, CUDA), in place."""
    num_seeded = rows.numel()
    if num_seeded == 0:
        return
    vocab_size = noise.shape[1]
    assert noise.stride(1) == 1 and noise.dtype == torch.float32, "noise must be row-major float32"
    block = 2048
    grid = (num_seeded, (vocab_size + block - 1) // block)
    kernel: Callable[..., Any] = _kernel()[grid]
    kernel(noise, noise.stride(0), rows, seed_lo, seed_hi, positions, vocab_size, write_uniform, BLOCK=block)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("triton is not installed: seeded sampling noise uses the torch implementation")
        return False
    return True
