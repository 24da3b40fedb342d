"""Gumbel-max sampling in two launches: ``gumbel_sample(logits, temperature, keys)`` -> [B] int64.

For a batch that only samples (every row random, no mask, bias, penalty, truncation or logprobs), the sampler's
steps after the model are a float32 copy of the logits, the temperature division, the exponential noise, its
clamp and log, the subtraction and the row argmax: seven passes over [B, V] (about 1 ms a step at 512 x 128k on
an H200, session 10's profile). Here stage 1 (``gumbel_kernels``) does all of them in one read of the logits as the
model wrote them, and stage 2 is ``argmax_rows``'s reduction.

The noise is the counter hash of ``treadle_model_runner.sample.gumbel`` under two 32-bit keys per row: the caller
derives them from (seed, position) for seeded rows, so a seeded row samples exactly as the torch path does (up to
float rounding of the logs), and draws them from torch's RNG for the others.
"""

from __future__ import annotations

import torch

from .sampling import row_chunks
from .support import next_pow2


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax over v of ``logits / T - log E`` per row: logits [B, V] (any float dtype, unit-stride vocab),
    temperature [B] float32 (> 0), keys [B, 2] int64 32-bit values. Returns [B] int64 on the logits' device."""
    from . import gumbel_kernels, sampling_kernels

    num_rows, vocab_size = logits.shape
    assert logits.stride(1) == 1, "the vocab dim must be unit-stride"
    assert temperature.shape == (num_rows,) and temperature.dtype == torch.float32
    assert keys.shape == (num_rows, 2) and keys.dtype == torch.int64 and keys.is_contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    chunk, num_chunks = row_chunks(vocab_size)
    partials = torch.empty((2, num_rows, num_chunks), dtype=torch.int32, device=logits.device)  # key | index
    stage1 = gumbel_kernels.gumbel_argmax_chunks_kernel[(num_rows, num_chunks)]
    stage1(logits, logits.stride(0), vocab_size, temperature, keys, partials[0], partials[1], CHUNK=chunk)
    block = next_pow2(num_chunks)
    sampling_kernels.argmax_reduce_kernel[(num_rows,)](
        partials[0], partials[1], num_chunks, out, CHUNKS_BLOCK=block, num_warps=min(max(block // 256, 1), 4)
    )
    return out
