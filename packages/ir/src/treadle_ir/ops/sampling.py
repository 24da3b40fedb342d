"""Sampling ops: ``argmax_rows``, the greedy token of each row of logits; ``token_logprobs``, the sampled tokens'
logprobs and ranks with the top logprobs of each row.

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

__all__ = ["argmax_rows", "token_logprobs"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor]:
    # the sampler's logits are fp32 whatever the model dtype
    return (torch.randn(8, 128256, device=device, dtype=torch.float32),)  # [num_seqs, vocab]


@op(example=_example)
def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (V >= 1) -> [B] int64: the first index of each row's maximum, NaN counting as largest."""
    return torch.argmax(logits, dim=-1)


def _logprobs_example(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    logits = torch.randn(8, 128256, device=device, dtype=dtype)  # [num_seqs, vocab], the model's dtype
    return logits, torch.randint(0, 128256, (8,), device=device), 5


@op(example=_logprobs_example)
def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logprobs of ``token_ids`` under ``logits`` with each row's ``num_top`` most likely tokens.

    logits [N, V] (any float dtype; finite or -inf), token_ids [N] (ids in [0, V)), 0 <= num_top <= V.
    Returns (ids [N, 1 + num_top] int64, logprobs [N, 1 + num_top] float32, ranks [N] int64):
    - logprobs are the float32 log-softmax of the logits (widened exactly to float32 first);
    - column 0 holds token_ids and their logprobs; columns 1.. the num_top largest logprobs, largest first
      (among equal logprobs providers may order the ids differently);
    - ranks: how many of the row's V logits are >= the token's logit (1 for the argmax; ties count against it).

    Why it is an op: asked through torch this is a float32 copy, the log-softmax, a comparison pass, a sum and
    torch.topk, about 1 ms a step at 256 x 128k on an H200 (session 17), while a provider can read the logits
    once."""
    x = logits.to(torch.float32)
    lp = torch.log_softmax(x, dim=-1)
    tok = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    above = x >= x.gather(1, tok)  # [N, V]: the logits that rank at or above the token's
    ranks = above.sum(dim=-1, dtype=torch.int32)  # int32: counting into int64 is slower on CPU
    top_values, top_ids = torch.topk(lp, num_top, dim=-1)  # [N, num_top]
    ids = torch.cat([tok, top_ids], dim=1)
    values = torch.cat([lp.gather(1, tok), top_values], dim=1)
    return ids, values, ranks.to(torch.int64)
