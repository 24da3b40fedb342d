"""Triton provider for ``argmax_rows``: logits [B, V] -> [B] int64, the first index of each row's maximum.

Why two launches: torch reduces a row with one thread block, which leaves a 128k-vocab batch-1 decode step on a
single SM for ~28 us. Here stage 1 spreads each row over ``cdiv(V, CHUNK)`` programs (126 for Llama-3's
128,256 logits) that write (order key, first index) per chunk to a small int32 scratch [2, B, chunks];
stage 2 reduces each row's chunks in one program. Launches :mod:`.sampling_kernels` (imported on first call).

Rows may be strided (a column slice of a wider buffer); the vocab dim must be unit-stride. The chunking
depends on V only, so each row's result is independent of the batch (batch-invariant).
"""

from __future__ import annotations

import torch

from treadle_ir import ops

from .support import check_tensor, next_pow2, triton_supported

__all__ = ["CHUNK", "MAX_VOCAB", "register"]

CHUNK = 1024  # logits per stage-1 program (4 warps x 8 per thread) when V > CHUNK
MAX_VOCAB = 1024 * CHUNK  # stage 2 holds a row's chunk partials in one block of at most 1024


def row_chunks(vocab_size: int, limit: int = CHUNK) -> tuple[int, int]:
    """A two-stage row kernel's stage-1 split of a row: (chunk, number of chunks), the chunk the whole row when it
    fits in ``limit``, else ``limit`` (shared by argmax_rows, gumbel_sample and token_logprobs)."""
    chunk = min(limit, max(16, next_pow2(vocab_size)))
    return chunk, -(-vocab_size // chunk)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    from . import sampling_kernels

    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)  # [B]
    if num_rows == 0:
        return out
    chunk, num_chunks = row_chunks(vocab_size)
    partials = torch.empty((2, num_rows, num_chunks), dtype=torch.int32, device=logits.device)  # key | index
    sampling_kernels.argmax_chunks_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), vocab_size, partials[0], partials[1], CHUNK=chunk, num_warps=4
    )
    block = next_pow2(num_chunks)
    sampling_kernels.argmax_reduce_kernel[(num_rows,)](
        partials[0], partials[1], num_chunks, out, CHUNKS_BLOCK=block, num_warps=min(max(block // 256, 1), 4)
    )
    return out


def _check(logits: torch.Tensor) -> bool | str:
    if (reason := check_tensor(logits, "logits")) is not None:
        return reason
    if logits.dim() != 2:
        return f"logits must be [B, V], got shape {tuple(logits.shape)}"
    if not 1 <= logits.shape[1] <= MAX_VOCAB:
        return f"vocab size {logits.shape[1]} outside [1, {MAX_VOCAB}]"
    return True


def register(provider: str = "triton") -> None:
    """Register the Triton row-argmax provider under ``provider``."""
    ops.argmax_rows.register_impl(
        provider, supported=triton_supported, supports_args=_check, batch_invariant=True
    )(argmax_rows)
