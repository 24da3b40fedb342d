"""Presence, frequency and repetition penalties, vectorized over the batch (vLLM / HF semantics).

For row b with output-token counts c[b, v] (occurrences of v in the tokens generated so far) and seen[b, v]
(v occurs in the prompt or in the output):

    repetition:  logit = logit / r   if seen and logit > 0
                 logit = logit * r   if seen and logit <= 0     (HF RepetitionPenaltyLogitsProcessor)
    frequency:   logit -= f * c
    presence:    logit -= p * (c > 0)

Repetition is applied first, then frequency and presence, as vLLM does. Presence and frequency count only
generated tokens; repetition also counts prompt tokens. Penalties of 0 / 0 / 1 leave a row unchanged, so rows
without penalties ride along in the same kernels.

The counts are built on the device from flat token lists: one host->device copy of all token ids, then a
scatter-add. Rows may be lists or numpy arrays (a persistent batch's token buffer): numpy rows are concatenated
with no per-token Python work at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch


def build_token_counts(
    output_ids: Sequence[Sequence[int] | np.ndarray],
    prompt_ids: Sequence[Sequence[int] | np.ndarray],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output_token_counts [B, V] float32, seen_token_mask [B, V] bool) for B = len(output_ids) rows.

    Token ids outside [0, vocab_size) (e.g. padding ids of a larger tokenizer) are ignored.
    """
    num_reqs = len(output_ids)
    out_counts = _scatter_counts(output_ids, num_reqs, vocab_size, device)
    prompt_counts = _scatter_counts(prompt_ids, num_reqs, vocab_size, device)
    seen = (out_counts > 0) | (prompt_counts > 0)
    return out_counts, seen


def _flatten(token_lists: Sequence[Sequence[int] | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids [T] int64, per-row lengths [B] int64) with no per-token Python work for numpy rows."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    if all(isinstance(t, np.ndarray) for t in token_lists):
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists] or [np.zeros(0, np.int64)])
    else:
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=total)
    return flat, lengths


def _scatter_counts(
    token_lists: Sequence[Sequence[int] | np.ndarray], num_reqs: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    counts = torch.zeros(num_reqs, vocab_size + 1, dtype=torch.float32, device=device)  # [B, V + 1]
    flat_np, lengths = _flatten(token_lists)
    if flat_np.size == 0:
        return counts[:, :vocab_size]
    flat = torch.from_numpy(flat_np).to(device)
    rows = torch.repeat_interleave(
        torch.arange(num_reqs, device=device), torch.from_numpy(lengths).to(device)
    )
    # out-of-vocabulary ids land in the spare last column, dropped below
    flat = torch.where((flat >= 0) & (flat < vocab_size), flat, vocab_size)
    counts.view(-1).index_add_(0, rows * (vocab_size + 1) + flat, torch.ones_like(flat, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    output_token_counts: torch.Tensor,
    seen_token_mask: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> torch.Tensor:
    """Penalize logits [B, V] in place (and return them). Penalty tensors are [B]."""
    rep = repetition_penalty.unsqueeze(1)  # [B, 1]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)  # [B, V]; divide, like HF, for bit parity
    logits.copy_(torch.where(seen_token_mask, penalized, logits))
    logits.sub_(frequency_penalty.unsqueeze(1) * output_token_counts)
    logits.sub_(presence_penalty.unsqueeze(1) * (output_token_counts > 0))
    return logits
