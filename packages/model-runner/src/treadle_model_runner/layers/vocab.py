"""The vocabulary ends of a model, split by vocabulary rows under tensor parallelism.

Rank r holds rows [r * L, (r + 1) * L) with L = ceil(vocab / size); the last rank's slice is padded with zero rows
when the vocabulary does not divide (one rank: L = vocab, nothing changes).
- `VocabParallelEmbedding`: each rank looks up the ids it holds (zero for the others); the ranks' rows are summed.
- `ParallelLMHead`: each rank computes its L logits; they are gathered and the padding dropped: [N, hidden] -> [N, V].
  A tied head shares the embedding's weight, which already holds this rank's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from treadle_ir import ops
from treadle_model_runner.parallel import all_gather_last, all_reduce, get_tp


class _VocabRows:
    """What both ends share: this rank's row range and how it is cut from a checkpoint's [vocab, hidden] tensor."""

    rank: int
    size: int
    rows: int  # L
    vocab_size: int
    hidden_size: int

    def _split(self, vocab_size: int, hidden_size: int) -> int:
        """Take this rank's place in the group; returns L, the rows it holds."""
        tp = get_tp()
        self.rank, self.size, self.vocab_size, self.hidden_size = tp.rank, tp.size, vocab_size, hidden_size
        self.rows = -(-vocab_size // tp.size)
        return self.rows

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.hidden_size)

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        rows = full[self.rank * self.rows :][: self.rows]
        if rows.shape[0] == self.rows:
            return rows
        return torch.cat([rows, rows.new_zeros(self.rows - rows.shape[0], rows.shape[1])])


class VocabParallelEmbedding(nn.Embedding, _VocabRows):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(self._split(vocab_size, hidden_size), hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.rank * self.rows
        held = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(held, local, 0), self.weight)
        return all_reduce(out.masked_fill_(~held.unsqueeze(-1), 0.0))


class ParallelLMHead(nn.Linear, _VocabRows):
    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, self._split(vocab_size, hidden_size), bias=False)

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden, self.weight, self.bias)
        return logits if self.size == 1 else all_gather_last(logits)[..., : self.vocab_size]
