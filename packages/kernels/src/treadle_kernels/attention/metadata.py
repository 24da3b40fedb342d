"""The per-step attention metadata every backend consumes.

A step is a ragged batch: request ``i`` contributes the query tokens
``query_start_loc[i]:query_start_loc[i + 1]`` of the flattened ``[num_tokens, ...]`` inputs, and after this step its
context holds ``seq_lens[i]`` tokens (cached + new). Query token ``j`` of request ``i`` therefore sits at absolute
position ``seq_lens[i] - query_len[i] + j``; a prefill has ``query_len == seq_len``, a decode has ``query_len == 1``,
a chunked prefill on top of cached blocks is anything in between. Keys live in a paged cache: logical block ``b`` of
request ``i`` is physical block ``block_table[i, b]``, and the new keys of this step are written to
``slot_mapping[t] = physical_block * block_size + offset`` before attention runs.

Invariants: ``query_start_loc`` is non-decreasing, starts at 0 and ends at ``num_actual_tokens``; ``query_len[i] <=
seq_lens[i]``; ``block_table[i]`` covers ``ceil(seq_lens[i] / block_size)`` blocks; tokens past
``num_actual_tokens`` are padding (slot ``-1``) and their outputs are unspecified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Backend-independent description of one step's attention (built once per step by the model runner)."""

    num_actual_tokens: int  # real tokens this step; inputs may be padded beyond it
    max_query_len: int  # longest query of the batch, in tokens
    max_seq_len: int  # longest context (cached + new) of the batch, in tokens
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32 on the device: prefix sums of query lengths
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1] int32 on the host, same values
    seq_lens: torch.Tensor  # [num_reqs] int32 on the device: context length after this step (cached + new)
    seq_lens_cpu: torch.Tensor  # [num_reqs] int32 on the host, same values
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32: physical block ids per logical block
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token, -1 for padding
    causal: bool = True  # False: every query sees the whole context (no decoder mask)

    @property
    def num_reqs(self) -> int:
        """Requests in this step."""
        return int(self.seq_lens_cpu.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """True when every request has at most one query token this step."""
        return self.max_query_len <= 1
