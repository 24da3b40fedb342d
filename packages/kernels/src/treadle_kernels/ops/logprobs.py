"""Triton provider for ``token_logprobs``: the sampled tokens' logprobs and ranks and each row's top logprobs,
reading the logits once (:mod:`.logprobs_kernels`, imported on first call).

Through torch the same is a float32 copy of the logits, the log-softmax, a comparison pass and its sum, and
torch.topk: about 1 ms a step at 256 x 128k on an H200, torch.topk alone 0.44 ms (session 17, call 1). Stage 1
spreads each row over ``cdiv(V, CHUNK)`` programs; stage 2 reduces a row's chunks in one program. The number of
top candidates a chunk keeps is ``num_top`` rounded up to one of ``TOPS`` (one compile each).
"""

from __future__ import annotations

import torch

from treadle_ir import ops

from .sampling import row_chunks
from .support import check_tensor, next_pow2, triton_supported

__all__ = ["CHUNK", "MAX_VOCAB", "TOPS", "register"]

CHUNK = 2048  # logits per stage-1 program (4 warps x 16 a thread) when V > CHUNK
MAX_VOCAB = 1024 * CHUNK  # stage 2 holds a row's chunk partials in one block of at most 1024
TOPS = (1, 2, 5, 10, 20)  # candidates kept per chunk: num_top rounded up to one of these


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import logprobs_kernels

    num_rows, vocab_size = logits.shape
    device = logits.device
    ids = torch.empty((num_rows, num_top + 1), dtype=torch.int64, device=device)
    values = torch.empty((num_rows, num_top + 1), dtype=torch.float32, device=device)
    ranks = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_rows == 0:
        return ids, values, ranks
    top = next((t for t in TOPS if t >= num_top), 0) if num_top else 0
    chunk, num_chunks = row_chunks(vocab_size, CHUNK)
    floats = torch.empty((2, num_rows, num_chunks), dtype=torch.float32, device=device)  # max | sum
    counts = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=device)
    candidates = torch.empty((2, num_rows, num_chunks, max(top, 1)), dtype=torch.int32, device=device)
    tokens = token_ids.to(torch.int64).contiguous()
    logprobs_kernels.logprobs_chunks_kernel[(num_rows, num_chunks)](
        logits, logits.stride(0), vocab_size, tokens, floats[0], floats[1], counts, candidates[0],
        candidates[1], CHUNK=chunk, TOP=top, num_warps=4,
    )  # fmt: skip
    block = next_pow2(num_chunks)
    logprobs_kernels.logprobs_reduce_kernel[(num_rows,)](
        logits, logits.stride(0), tokens, floats[0], floats[1], counts, candidates[0], candidates[1],
        num_chunks, num_top, ids, values, ranks, CHUNKS_BLOCK=block,
        CANDIDATES_BLOCK=next_pow2(num_chunks * max(top, 1)), TOP=top, num_warps=4,
    )  # fmt: skip
    return ids, values, ranks


def _check(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> bool | str:
    if (reason := check_tensor(logits, "logits")) is not None:
        return reason
    if logits.dim() != 2 or logits.stride(1) != 1:
        return f"logits must be [N, V] with a unit-stride vocab dim, got shape {tuple(logits.shape)}"
    if not 1 <= logits.shape[1] <= MAX_VOCAB:
        return f"vocab size {logits.shape[1]} outside [1, {MAX_VOCAB}]"
    if token_ids.shape != (logits.shape[0],) or token_ids.device != logits.device:
        return f"token_ids must be [{logits.shape[0]}] on {logits.device}, got {tuple(token_ids.shape)}"
    if not 0 <= num_top <= min(TOPS[-1], logits.shape[1]):
        return f"num_top {num_top} outside [0, {min(TOPS[-1], logits.shape[1])}]"
    return True


def register(provider: str = "triton") -> None:
    """Register the Triton token-logprobs provider under ``provider``."""
    ops.token_logprobs.register_impl(
        provider, supported=triton_supported, supports_args=_check, batch_invariant=True
    )(token_logprobs)
