"""Logprobs: the chosen token's logprob and 1-based rank, plus the top-k logprobs, on the device.

`LogprobsTensors` is the device-side result (one row per sampled token or prompt position); `tolists` turns it
into the host contract `Logprobs` (outputs.py) with a single device->host copy per tensor.

Which logits. The sampler follows vLLM v1's default (`logprobs_mode="raw_logprobs"`): logprobs are the
log-softmax of the model's raw logits, before logit bias, penalties, temperature and truncation, so they
describe the model rather than the sampling recipe. `Sampler(logprobs_mode="processed_logprobs")` instead
reports the log-softmax of the logits the token was actually drawn from (after every processing step; truncated
tokens get -inf). Prompt logprobs are always raw.

Rank. rank = number of tokens whose logit is >= the chosen token's (vLLM counts logprobs >= the chosen one's,
the same order up to float32 rounding of the log-softmax): 1 for the argmax, ties counted against the chosen
token.

Top-k. Column 0 holds the chosen token; columns 1..K the K most likely tokens by logprob, where K is the largest
number asked for in the batch; `tolists` cuts each row to what its request asked for (0 = only the chosen token).
K is at most the vocabulary V: a request for the whole vocabulary (logprobs = -1, allowed by the engine's
max_logprobs) gets K = V, every token once in columns 1..V, sorted by logprob. That case skips the top-k op (its
fast provider keeps at most 20 candidates a chunk, and a top-V is a sort anyway): one float32 log-softmax and one
sort of the rows, the cost of the [N, V] tensors the request asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from treadle_ir import ops
from treadle_model_runner.outputs import Logprobs
from treadle_model_runner.sampling_params import num_top_logprobs


@dataclass(slots=True)
class LogprobsTensors:
    token_ids: torch.Tensor  # [N, K + 1] int64: column 0 the chosen token, then the top-K tokens
    logprobs: torch.Tensor  # [N, K + 1] float32: natural-log probabilities of those tokens
    ranks: torch.Tensor  # [N] int64: 1-based rank of the chosen token among all V tokens

    @property
    def num_top(self) -> int:
        """K: top logprobs held per row."""
        return self.token_ids.shape[1] - 1

    def tolists(self, num_logprobs: Sequence[int] | int) -> list[Logprobs | None]:
        """Host `Logprobs` per row, cut to num_logprobs[i] top entries; None for rows with num_logprobs -1."""
        n = self.token_ids.shape[0]
        counts = [num_logprobs] * n if isinstance(num_logprobs, int) else list(num_logprobs)
        assert len(counts) == n, f"tolists got {len(counts)} counts for {n} rows"
        token_ids = self.token_ids.cpu().tolist()
        logprobs = self.logprobs.cpu().tolist()
        ranks = self.ranks.cpu().tolist()
        num_top = self.num_top
        assert max(counts, default=-1) <= num_top, (
            f"rows ask for up to {max(counts)} top logprobs, {num_top} computed"
        )
        if counts.count(num_top) == n:  # every row whole (the usual step: one logprobs value in the batch)
            return list(map(Logprobs, token_ids, logprobs, ranks))
        out: list[Logprobs | None] = []
        for i, k in enumerate(counts):
            if k < 0:
                out.append(None)
            elif k == num_top:  # the whole row (tolist made each row its own list)
                out.append(Logprobs(token_ids[i], logprobs[i], ranks[i]))
            else:
                out.append(Logprobs(token_ids[i][: k + 1], logprobs[i][: k + 1], ranks[i]))
        return out


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """The logprob and rank of token_ids [N] under logits [N, V] (log-softmaxed in float32 here), plus the top
    num_top logprobs of each row: ``ops.token_logprobs``, which a provider computes in one read of the logits.
    num_top >= V gives every token of the row, sorted (`full_vocab_logprobs`)."""
    if num_top < 0:
        raise ValueError(f"num_top ({num_top}) must be >= 0 (the number of top logprobs per row)")
    if num_top >= logits.shape[1]:
        return full_vocab_logprobs(logits, token_ids)
    return LogprobsTensors(*ops.token_logprobs(logits, token_ids, num_top))


def full_vocab_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> LogprobsTensors:
    """``ops.token_logprobs`` with num_top = V: the whole log-softmax row, sorted largest first, by one sort."""
    x = logits.to(torch.float32)
    lp = torch.log_softmax(x, dim=-1)  # [N, V]
    tok = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    ranks = (x >= x.gather(1, tok)).sum(dim=-1, dtype=torch.int32).to(torch.int64)  # [N]
    sorted_values, sorted_ids = torch.sort(lp, dim=-1, descending=True)  # [N, V]
    ids = torch.cat([tok, sorted_ids], dim=1)  # [N, V + 1]
    values = torch.cat([lp.gather(1, tok), sorted_values], dim=1)  # [N, V + 1]
    return LogprobsTensors(ids, values, ranks)


def compute_prompt_logprobs_tensors(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Device-side prompt logprobs: logits [T, V] at prompt positions, next_token_ids [T] = prompt token i + 1;
    num_logprobs is the request's prompt_logprobs (-1 = the whole vocabulary)."""
    if logits.shape[0] != next_token_ids.shape[0]:
        raise ValueError(
            f"prompt logprobs need one next token per position: got {logits.shape[0]} logits rows and "
            f"{next_token_ids.shape[0]} next tokens"
        )
    return token_logprobs(logits, next_token_ids, num_top_logprobs(num_logprobs, logits.shape[1]))


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> list[Logprobs]:
    """Per prompt position i: the logprob and rank of prompt token i + 1, plus the top num_logprobs (raw logits).

    logits [T, V] are the model's outputs at T prompt positions, next_token_ids [T] the tokens that follow them;
    num_logprobs -1 asks for the whole vocabulary. For long prompts call it chunk by chunk: the torch op
    materializes a [T, V] float32 log-softmax.
    """
    tensors = compute_prompt_logprobs_tensors(logits, next_token_ids, num_logprobs)
    result = tensors.tolists(tensors.num_top)
    return [lp for lp in result if lp is not None]
