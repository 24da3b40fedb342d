"""Logprobs: the chosen token's logprob and 1-based rank, plus the top-k logprobs, on the device.

`LogprobsTensors` is the device-side result (one row per sampled token or prompt position); `tolists` turns it
into the host contract `Logprobs` (outputs.py) with a single device->host copy per tensor.

Which logits. The sampler follows vLLM v1's default (`logprobs_mode="raw_logprobs"`): logprobs are the
log-softmax of the model's raw logits, before logit bias, penalties, temperature and truncation, so they
describe the model rather than the sampling recipe. `Sampler(logprobs_mode="processed_logprobs")` instead
reports the log-softmax of the logits the token was actually drawn from (after every processing step; truncated
tokens get -inf). Prompt logprobs are always raw.

Rank. rank = number of tokens whose logprob is >= the chosen token's (vLLM's convention): 1 for the argmax,
ties counted against the chosen token.

Top-k. Column 0 holds the chosen token; columns 1..K the K most likely tokens by logprob, where K is the largest
number asked for in the batch; `tolists` cuts each row to what its request asked for (0 = only the chosen token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from treadle_model_runner.outputs import Logprobs
from treadle_model_runner.sampling_params import MAX_LOGPROBS


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
        out: list[Logprobs | None] = []
        for i, k in enumerate(counts):
            if k < 0:
                out.append(None)
                continue
            assert k <= self.num_top, f"row {i} asks for {k} top logprobs, only {self.num_top} were computed"
            out.append(Logprobs(token_ids[i][: k + 1], logprobs[i][: k + 1], ranks[i]))
        return out


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsTensors:
    """Chosen-token logprob and rank plus the top num_top logprobs. logprobs [N, V] (log-softmaxed), token_ids [N]."""
    if not 0 <= num_top <= MAX_LOGPROBS:
        raise ValueError(
            f"num_top ({num_top}) must be in [0, {MAX_LOGPROBS}]; ask for at most {MAX_LOGPROBS}"
        )
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    chosen = logprobs.gather(1, token_ids)  # [N, 1]
    ranks = (logprobs >= chosen).sum(dim=-1)  # [N]
    if num_top > 0:
        top_values, top_ids = torch.topk(logprobs, num_top, dim=-1)  # [N, K]
        ids = torch.cat([token_ids, top_ids], dim=1)
        values = torch.cat([chosen, top_values], dim=1)
    else:
        ids, values = token_ids, chosen
    return LogprobsTensors(token_ids=ids, logprobs=values.to(torch.float32), ranks=ranks.to(torch.int64))


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in float32 over the last dimension. [N, V] -> [N, V]."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def compute_prompt_logprobs_tensors(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Device-side prompt logprobs: logits [T, V] at prompt positions, next_token_ids [T] = prompt token i + 1."""
    if logits.shape[0] != next_token_ids.shape[0]:
        raise ValueError(
            f"prompt logprobs need one next token per position: got {logits.shape[0]} logits rows and "
            f"{next_token_ids.shape[0]} next tokens"
        )
    return gather_logprobs(compute_logprobs(logits), next_token_ids, max(num_logprobs, 0))


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> list[Logprobs]:
    """Per prompt position i: the logprob and rank of prompt token i + 1, plus the top num_logprobs (raw logits).

    logits [T, V] are the model's outputs at T prompt positions, next_token_ids [T] the tokens that follow them.
    For long prompts call it chunk by chunk: it materializes a [T, V] float32 log-softmax.
    """
    result = compute_prompt_logprobs_tensors(logits, next_token_ids, num_logprobs).tolists(
        max(num_logprobs, 0)
    )
    return [lp for lp in result if lp is not None]
