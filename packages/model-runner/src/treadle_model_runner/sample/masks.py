"""Token masks and logit bias: the first processing step, applied to the raw logits in place.

- allowed_token_ids: every token outside a request's list gets -inf (`allowed_mask`, True = not allowed);
- bad words: a word's last token gets -inf when the word's preceding tokens end the output so far (a one-token
  word is always banned); decided on the host while building the metadata, applied here as (row, token) pairs;
- min_tokens: while a request has fewer than min_tokens output tokens, its stop tokens (EOS included:
  `SamplingParams.all_stop_token_ids`) get -inf, sharing the (row, token) pairs with bad words;
- logit_bias: value added to the logit of (row, token).

Bias comes last, so a banned token stays at -inf whatever its bias.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def apply_token_masks(
    logits: torch.Tensor, allowed_mask: torch.Tensor | None, banned_indices: torch.Tensor | None
) -> torch.Tensor:
    """Set not-allowed and banned tokens of contiguous logits [B, V] to -inf, in place.

    banned_indices [M] int64 are flat: row * V + token (index_fill_ takes a Python scalar: no host->device copy).
    """
    if allowed_mask is not None:
        logits.masked_fill_(allowed_mask, _NEG_INF)
    if banned_indices is not None:
        logits.view(-1).index_fill_(0, banned_indices, _NEG_INF)
    return logits


def apply_logit_bias(
    logits: torch.Tensor, bias_indices: torch.Tensor | None, bias_values: torch.Tensor | None
) -> torch.Tensor:
    """Add bias_values [N] at flat bias_indices [N] (row * V + token) of contiguous logits [B, V], in place."""
    if bias_indices is not None and bias_values is not None:
        logits.view(-1).index_add_(0, bias_indices, bias_values)
    return logits
