"""Input preparation: from the persistent batch and this step's token counts to the model's flat inputs.

Everything here is vectorized numpy over the step's T tokens (no per-token Python): with q[i] tokens scheduled
for batch row i and c[i] already computed,
    query_start_loc = [0, cumsum(q)]            req_idx[t] = row of token t   (np.repeat)
    positions[t]    = c[req_idx[t]] + (t - query_start_loc[req_idx[t]])
    input_ids[t]    = token_ids[req_idx[t], positions[t]]   (one gather on the flat token table)
    seq_lens        = c + q                     slot_mapping per KV-cache group from its block table
Logits are computed only for rows whose computation reaches the end of their known tokens (c + q >= num_tokens):
the last scheduled token of a decode or a final prefill chunk; a partial prefill chunk samples nothing.

Host staging tensors are pinned on CUDA and copied into persistent device buffers non-blocking, so a CUDA graph
captured on those buffers sees each step's values. Tokens in [T, padded T) are padding: id 0, position 0,
slot -1, and (decode graphs) one-token requests of context 1 that nobody reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from treadle_kernels.attention import AttentionMetadata
from treadle_model_runner.runner.input_batch import InputBatch


@dataclass(slots=True)
class StepInputs:
    num_reqs: int  # requests in the step (real)
    num_tokens: int  # real tokens in the step
    num_padded_tokens: int  # tokens the model runs on (>= num_tokens; CUDA-graph size when padded)
    num_scheduled: np.ndarray  # [num_reqs] int64 tokens per request
    query_start: np.ndarray  # [num_reqs + 1] int64 host prefix sums
    input_ids: torch.Tensor  # [num_padded_tokens] int64 on the device
    positions: torch.Tensor  # [num_padded_tokens] int64 on the device
    attn_metadata: list[AttentionMetadata]  # per KV-cache group
    sample_rows: np.ndarray  # [S] batch rows that sample a token this step
    logits_indices: torch.Tensor  # [S] int64 token index of each sampled row's last scheduled token
    is_decode_only: bool  # every request has exactly one token this step


class StepBuffers:
    """Persistent host staging (pinned on CUDA) and device buffers for one step's inputs."""

    def __init__(self, max_num_tokens: int, max_num_reqs: int, num_groups: int, device: torch.device) -> None:
        pin = device.type == "cuda"

        def pair(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(n, dtype=dtype, pin_memory=pin), torch.zeros(n, dtype=dtype, device=device)

        self.device = device
        self.input_ids = pair(max_num_tokens, torch.int64)
        self.positions = pair(max_num_tokens, torch.int64)
        self.query_start_loc = pair(max_num_reqs + 1, torch.int32)
        self.seq_lens = pair(max_num_reqs, torch.int32)
        self.slot_mappings = [pair(max_num_tokens, torch.int64) for _ in range(num_groups)]
        self.logits_indices = pair(max_num_reqs, torch.int64)
        # input tokens sampled by the step in flight (async output): their token index and source index
        self.hole_positions = pair(max_num_reqs, torch.int64)
        self.hole_sources = pair(max_num_reqs, torch.int64)
        # set after the step's host->device copies: pinned host memory (these buffers, the block tables) must
        # not be rewritten before the copies reading it ran (a step that samples nothing never syncs)
        self.copies_done = torch.cuda.Event() if device.type == "cuda" else None

    def wait_for_copies(self) -> None:
        """Block until the previous step's non-blocking copies from pinned host memory have run."""
        if self.copies_done is not None:
            self.copies_done.synchronize()


def _commit(buffers: tuple[torch.Tensor, torch.Tensor], values: np.ndarray, n: int) -> torch.Tensor:
    host, dev = buffers
    host.numpy()[:n] = values
    dev[:n].copy_(host[:n], non_blocking=True)
    return dev[:n]


# batch rows -> (device tensor of tokens in flight, index of each row's token in it); see pending.py
PlaceholderSource = Callable[[np.ndarray], tuple[torch.Tensor, np.ndarray]]


def prepare_inputs(
    batch: InputBatch,
    num_scheduled: np.ndarray,
    buffers: StepBuffers,
    num_padded_tokens: int | None = None,
    placeholders: PlaceholderSource | None = None,
) -> StepInputs:
    """Build the step's device inputs for rows [0, len(num_scheduled)); pad tokens up to num_padded_tokens.

    Input tokens still in flight (placeholders, < 0) are gathered on the device from `placeholders`.
    """
    num_reqs = len(num_scheduled)
    num_tokens = int(num_scheduled.sum())
    padded = num_tokens if num_padded_tokens is None else num_padded_tokens
    is_decode_only = bool(num_reqs > 0 and (num_scheduled == 1).all())
    # decode graphs (and their capture, with no real request): padding tokens are one-token dummy requests
    num_pad_reqs = padded - num_tokens if is_decode_only or num_reqs == 0 else 0

    cu = np.cumsum(num_scheduled, dtype=np.int64)
    query_start = np.concatenate([[0], cu]).astype(np.int64)
    req_idx = np.repeat(np.arange(num_reqs), num_scheduled)
    computed = batch.num_computed_tokens[:num_reqs]
    positions = computed[req_idx] + np.arange(num_tokens) - query_start[req_idx]
    seq_lens = computed + num_scheduled

    max_len = batch.max_model_len
    flat_ids = torch.from_numpy(req_idx * max_len + positions)
    ids = torch.index_select(batch.token_ids_cpu.view(-1), 0, flat_ids).numpy()

    def padded_tokens(values: np.ndarray, fill: int) -> np.ndarray:
        return (
            values if padded == num_tokens else np.concatenate([values, np.full(padded - num_tokens, fill)])
        )

    holes = np.flatnonzero(ids < 0)
    if holes.size:
        if placeholders is None:
            raise RuntimeError(
                f"{holes.size} input token(s) are placeholders but no step in flight holds them"
            )
        ids = np.where(ids < 0, 0, ids)
    input_ids = _commit(buffers.input_ids, padded_tokens(ids, 0), padded)
    if holes.size:
        assert placeholders is not None
        source, index = placeholders(req_idx[holes])
        hole_pos = _commit(buffers.hole_positions, holes, holes.size)
        hole_src = _commit(buffers.hole_sources, index, holes.size)
        input_ids.index_copy_(0, hole_pos, source.index_select(0, hole_src))
    positions_dev = _commit(buffers.positions, padded_tokens(positions, 0), padded)
    n_meta = num_reqs + num_pad_reqs
    qsl = np.concatenate([query_start, num_tokens + np.arange(1, num_pad_reqs + 1)])
    qsl_dev = _commit(buffers.query_start_loc, qsl, n_meta + 1)
    seq_all = np.concatenate([seq_lens, np.ones(num_pad_reqs, dtype=np.int64)])
    seq_dev = _commit(buffers.seq_lens, seq_all, n_meta)
    qsl_cpu = buffers.query_start_loc[0][: n_meta + 1]
    seq_cpu = buffers.seq_lens[0][:n_meta]
    metadata = []
    for table, slot_buf in zip(batch.block_tables, buffers.slot_mappings, strict=True):
        slots = _commit(slot_buf, padded_tokens(table.slot_mapping(req_idx, positions), -1), padded)
        metadata.append(
            AttentionMetadata(
                num_actual_tokens=padded if num_pad_reqs else num_tokens,
                max_query_len=max(int(num_scheduled.max()) if num_reqs else 0, 1 if num_pad_reqs else 0),
                max_seq_len=int(seq_all.max()) if n_meta else 0,
                query_start_loc=qsl_dev,
                query_start_loc_cpu=qsl_cpu,
                seq_lens=seq_dev,
                seq_lens_cpu=seq_cpu,
                block_table=table.commit(n_meta),
                slot_mapping=slots,
            )
        )

    sample_rows = np.nonzero(seq_lens >= batch.num_tokens[:num_reqs])[0]
    logits_indices = _commit(buffers.logits_indices, cu[sample_rows] - 1, len(sample_rows))
    if buffers.copies_done is not None:
        buffers.copies_done.record()
    return StepInputs(
        num_reqs=num_reqs,
        num_tokens=num_tokens,
        num_padded_tokens=padded,
        num_scheduled=num_scheduled,
        query_start=query_start,
        input_ids=input_ids,
        positions=positions_dev,
        attn_metadata=metadata,
        sample_rows=sample_rows,
        logits_indices=logits_indices,
        is_decode_only=is_decode_only,
    )
