"""The persistent batch: one row per request scheduled this step, kept across steps and changed by diffs.

Rows [0, num_reqs) are dense and hold exactly this step's scheduled requests, in batch order. Each step the
runner removes rows of finished, preempted and unscheduled requests, adds rows for new or resumed ones, and
`condense()` moves the last rows into the holes, so most rows (a steady decode batch) are never rewritten.

Per row: the request's token ids (prompt then outputs) in `token_ids` [max_num_reqs, max_model_len] (int32,
host numpy), `num_tokens` (tokens known), `num_prompt_tokens`, `num_computed_tokens` (tokens with KV in
the cache before this step), and one block-table row per KV-cache group. Sampled tokens are appended here by
`append_tokens` (`append_runs` after a step that verified drafts), so the next decode step finds its input token
without the scheduler sending it. Columns past `num_tokens` are scratch: a step's draft tokens wait there.
"""

from __future__ import annotations

import numpy as np
import torch

from treadle_model_runner.runner.block_table import BlockTable
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.sample.drafts import concat_ranges


class InputBatch:
    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        block_size: int,
        num_groups: int,
        device: torch.device,
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        # host only: the step gathers its input ids from here into the pinned upload buffer (inputs.py)
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.lora_ids = np.zeros(max_num_reqs, dtype=np.int64)  # the row's LoRA adapter (0: the base model)
        max_blocks = -(-max_model_len // block_size)
        self.block_tables = [
            BlockTable(max_num_reqs, max_blocks, block_size, device) for _ in range(num_groups)
        ]
        self.req_ids: list[str | None] = [None] * max_num_reqs  # row -> request id (None = hole)
        self.states: list[RequestState | None] = [None] * max_num_reqs  # row -> request state
        self.req_id_to_row: dict[str, int] = {}
        self.num_reqs = 0  # rows [0, num_reqs) may hold requests (holes until condense())

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.req_id_to_row

    def add(self, state: RequestState) -> None:
        """Put a request into the first free row, copying its tokens and block ids from its state."""
        row = next((r for r in range(self.num_reqs) if self.req_ids[r] is None), self.num_reqs)
        if row >= self.max_num_reqs:
            raise ValueError(
                f"more than max_num_seqs ({self.max_num_reqs}) requests scheduled in one step; "
                "the scheduler must respect max_num_seqs"
            )
        num_tokens = state.num_tokens
        if num_tokens > self.max_model_len:
            raise ValueError(
                f"request {state.req_id} has {num_tokens} tokens, more than max_model_len ({self.max_model_len})"
            )
        self.token_ids[row, :num_tokens] = state.all_token_ids()
        self.num_tokens[row] = num_tokens
        self.num_prompt_tokens[row] = len(state.prompt_token_ids)
        self.num_computed_tokens[row] = state.num_computed_tokens
        self.lora_ids[row] = state.lora_id
        for table, block_ids in zip(self.block_tables, state.block_ids, strict=True):
            table.set_row(row, block_ids)
        self.req_ids[row] = state.req_id
        self.states[row] = state
        self.req_id_to_row[state.req_id] = row
        self.num_reqs = max(self.num_reqs, row + 1)

    def remove(self, req_id: str) -> None:
        row = self.req_id_to_row.pop(req_id, None)
        if row is not None:
            self.req_ids[row] = None
            self.states[row] = None
            for table in self.block_tables:
                table.clear_row(row)

    def condense(self) -> None:
        """Fill holes by moving the last rows down, so rows [0, num_reqs) are all occupied."""
        last = self.num_reqs - 1
        for hole in range(self.num_reqs):
            if self.req_ids[hole] is not None:
                continue
            while last > hole and self.req_ids[last] is None:
                last -= 1
            if last <= hole:
                break
            self._move(last, hole)
            last -= 1
        while self.num_reqs > 0 and self.req_ids[self.num_reqs - 1] is None:
            self.num_reqs -= 1

    def _move(self, src: int, dst: int) -> None:
        n = int(self.num_tokens[src])
        self.token_ids[dst, :n] = self.token_ids[src, :n]
        for arr in (self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens, self.lora_ids):
            arr[dst] = arr[src]
        for table in self.block_tables:
            table.move_row(src, dst)
        req_id = self.req_ids[src]
        assert req_id is not None, f"moving an empty row {src}"
        self.req_ids[dst], self.states[dst] = req_id, self.states[src]
        self.req_ids[src], self.states[src] = None, None
        self.req_id_to_row[req_id] = dst

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Append one sampled token to each of `rows` (vectorized over rows)."""
        if rows.size and int(self.num_tokens[rows].max()) >= self.max_model_len:
            raise ValueError(f"a request reached max_model_len ({self.max_model_len}); it must finish first")
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1

    def append_runs(self, rows: np.ndarray, counts: np.ndarray, token_ids: np.ndarray) -> None:
        """Append counts[i] tokens to rows[i] (several after a step that verified drafts); `token_ids` holds the
        runs one after the other (vectorized over rows and tokens)."""
        ends = self.num_tokens[rows] + counts
        if rows.size and int(ends.max()) > self.max_model_len:
            raise ValueError(f"a request reached max_model_len ({self.max_model_len}); it must finish first")
        self.token_ids[np.repeat(rows, counts), concat_ranges(self.num_tokens[rows], counts)] = token_ids
        self.num_tokens[rows] = ends
