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
    logits: torch.Tensor,
    allowed_mask: torch.Tensor | None,
    banned_rows: torch.Tensor | None,
    banned_cols: torch.Tensor | None,
) -> torch.Tensor:
    """Set not-allowed and banned tokens of logits [B, V] to -inf, in place."""
    if allowed_mask is not None:
        logits.masked_fill_(allowed_mask, _NEG_INF)
    if banned_rows is not None and banned_cols is not None:
        logits.index_put_((banned_rows, banned_cols), torch.tensor(_NEG_INF, device=logits.device))
    return logits


def apply_logit_bias(
    logits: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, values: torch.Tensor | None
) -> torch.Tensor:
    """Add values [N] to logits[rows, cols] in place ((row, token) pairs are unique per request)."""
    if rows is not None and cols is not None and values is not None:
        logits.index_put_((rows, cols), values, accumulate=True)
    return logits
