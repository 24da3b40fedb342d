"""Sampling ops: ``argmax_rows``, the greedy token of each row of logits.

Why it is an op: a batch-1 decode step of an 8B model with a 128k vocabulary spends tens of microseconds in
``logits.argmax(dim=-1)``, which torch runs as one thread block per row; a provider can spread one row over
many programs and reduce their partial results in a second launch.

Semantics (what every provider matches, exactly): ``torch.argmax(logits, dim=-1)``. Each row yields the
FIRST index of its maximum; NaN counts as larger than every number (a row holding NaN yields its first NaN);
``-0.0 == 0.0`` ties; a row that is all ``-inf`` yields 0. The result is int64 [B].
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = ["argmax_rows"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
    # the sampler's logits are fp32 whatever the model dtype
    return (torch.randn(8, 128256, device=device, dtype=torch.float32),)  # [num_seqs, vocab]


@op(example=_example)
def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (V >= 1) -> [B] int64: the first index of each row's maximum, NaN counting as largest."""
    return torch.argmax(logits, dim=-1)
