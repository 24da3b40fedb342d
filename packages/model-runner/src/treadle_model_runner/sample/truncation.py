"""Min-p, top-k and top-p truncation: tokens outside the kept set get logit -inf.

Applied to temperature-scaled logits [B, V], per row, in this order:

- min-p keeps tokens with prob >= min_p * max prob. In log space: logit >= max logit + log(min_p), which needs
  no softmax; min_p = 0 gives log 0 = -inf and keeps every token.
- top-k keeps the k largest logits (ties at the k-th value are all kept). k = V keeps every token.
- top-p keeps the smallest set of most likely tokens whose probability mass (after min-p and top-k) reaches p:
  token t is kept iff the mass of the tokens strictly more likely than t is < p. The most likely token is always
  kept, so no row is ever emptied.

top-k alone uses torch.topk with the batch's largest k (cheap for the usual small k); top-p needs one sort of
the row, and top-k then reads its threshold from the same sort. Rows with the "off" value ride along unchanged.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask in place tokens with prob < min_p * max prob. logits [B, V], min_p [B]."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # [B, 1]
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """Mask in place (and return) tokens outside top-k, then outside top-p.

    top_k [B] int64 in [1, V] (V = off), top_p [B] float32 (1 = off); max_top_k: the largest k below V in the
    batch (host int, so no device sync is needed to size torch.topk).
    """
    if top_p is None:
        if top_k is None:
            return logits
        return _apply_top_k_only(logits, top_k, max_top_k)
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)  # [B, V] ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # [B, 1] k-th largest logit
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    # ascending cumulative mass; cum[j] <= 1 - p  <=>  mass of the tokens above j >= p  => drop j
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always stays
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, sorted_idx, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    max_k = min(max(max_top_k, 1), logits.shape[-1])
    top_values = torch.topk(logits, max_k, dim=-1, sorted=True).values  # [B, max_k] descending
    kth = top_values.gather(1, (top_k.clamp(max=max_k) - 1).unsqueeze(1))  # [B, 1]
    kth = torch.where(top_k.unsqueeze(1) > max_k, _NEG_INF, kth)  # rows without top-k keep everything
    return logits.masked_fill_(logits < kth, _NEG_INF)
