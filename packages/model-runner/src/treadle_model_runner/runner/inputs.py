"""Input preparation: from the persistent batch and this step's token counts to the model's flat inputs.

The host does only per-request work (numpy over the R requests): with q[i] tokens scheduled for batch row i and
c[i] already computed, it forms query_start = [0, cumsum(q)] and seq_lens = c + q (the attention backends plan
from these host copies), max_query_len, max_seq_len and the rows that sample. The one T-sized host job is the
input ids, which only the host knows: one gather on the flat token table,
    input_ids[t] = token_ids[row of t, c[row] + t - query_start[row]].
It stages q, c and the ids in pinned memory and sends them with one non-blocking copy; the block tables send
only their dirty rows (block_table.py); the device builds positions, query_start_loc, seq_lens and the slot
mappings (device_inputs.py). Nothing here waits for the device.

Logits are computed only for rows whose computation reaches the end of their known tokens (c + q >= num_tokens):
the last scheduled token of a decode or a final prefill chunk; a partial prefill chunk samples nothing. A row that
verifies k draft tokens (speculative decoding, spec_decode.py) gets logits at each of its 1 + k tokens.
Input tokens still in flight (async output, placeholders < 0) are staged as 0 and overwritten on the device from
the tensor of the step that samples them. Tokens in [T, padded T) are padding: id 0, position 0, slot -1, and
(decode graphs) one-token requests of context 1 that nobody reads; a verify or mixed graph's step pads its
requests with empty ones (no tokens, context 0) and its tokens with rows that belong to no request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from treadle_kernels.attention import AttentionMetadata
from treadle_model_runner.runner.device_inputs import StepBuffers, commit, compute_on_device, stage_and_commit
from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.runner.spec_decode import draft_logits_indices


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
    # [S] int64 token index of each sampled row's last scheduled token; with drafts [S + drafts]: each sampled
    # row's 1 + len(drafts) last tokens, in order
    logits_indices: torch.Tensor
    is_decode_only: bool  # every request has exactly one token this step
    # per sampling row: the draft tokens it verifies ([] for most); None when no request of the step has any
    sample_drafts: list[list[int]] | None = None


# batch rows -> (device tensor of tokens in flight, index of each row's token in it); see pending.py
PlaceholderSource = Callable[[np.ndarray], tuple[torch.Tensor, np.ndarray]]


def prepare_inputs(
    batch: InputBatch,
    num_scheduled: np.ndarray,
    buffers: StepBuffers,
    num_padded_tokens: int | None = None,
    placeholders: PlaceholderSource | None = None,
    drafts: list[list[int]] | None = None,
    computed: np.ndarray | None = None,
    num_padded_reqs: int | None = None,
) -> StepInputs:
    """Build the step's device inputs for rows [0, len(num_scheduled)); pad tokens up to num_padded_tokens.

    Input tokens still in flight (placeholders, < 0) are gathered on the device from `placeholders`. `drafts`:
    per row, the draft tokens it verifies (already staged in the token table by spec_decode.stage_drafts).
    `computed`: per row, the position its first token goes to (default: its num_computed_tokens; a draft model's
    passes run at other positions, runner/draft_model.py). `num_padded_reqs`: the request count the metadata
    pads to with empty dummy requests (no tokens: verify and mixed graphs, batch_graphs.py); by default a
    decode-only step (or one with no request: a capture) pads every padding token as a one-token request, any
    other step none.
    """
    num_reqs = len(num_scheduled)
    num_tokens = int(num_scheduled.sum())
    padded = num_tokens if num_padded_tokens is None else num_padded_tokens
    is_decode_only = bool(num_reqs > 0 and (num_scheduled == 1).all())
    # decode graphs (and their capture, with no real request): padding tokens are one-token dummy requests
    num_pad_reqs = padded - num_tokens if is_decode_only or num_reqs == 0 else 0
    if num_padded_reqs is not None:
        num_pad_reqs = num_padded_reqs - num_reqs
    n_meta = num_reqs + num_pad_reqs

    cu = np.cumsum(num_scheduled, dtype=np.int64)
    query_start = np.concatenate([[0], cu]).astype(np.int64)
    if computed is None:
        computed = batch.num_computed_tokens[:num_reqs]
    seq_lens = computed + num_scheduled

    # stage [q | c | input ids] and send them in one copy
    r, t = num_reqs, num_tokens
    staged = buffers.upload[0].numpy()
    staged[:r] = num_scheduled
    staged[r : 2 * r] = computed
    ids = staged[2 * r : 2 * r + t]
    gather_input_ids(batch, computed, num_scheduled, query_start, out=ids)
    holes = np.flatnonzero(ids < 0)
    if holes.size:
        if placeholders is None:
            raise RuntimeError(
                f"{holes.size} input token(s) are placeholders but no step in flight holds them"
            )
        ids[holes] = 0
    commit(buffers.upload, 2 * r + t)
    block_tables = [table.commit(n_meta) for table in batch.block_tables]
    empty_pads = num_padded_reqs is not None
    compute_on_device(buffers, batch.block_tables, num_reqs, num_tokens, padded, num_pad_reqs, empty_pads)
    input_ids = buffers.input_ids[:padded]
    if holes.size:
        assert placeholders is not None
        hole_rows = np.searchsorted(query_start, holes, side="right") - 1
        source, index = placeholders(hole_rows)
        hole_pos = stage_and_commit(buffers.hole_positions, holes)
        hole_src = stage_and_commit(buffers.hole_sources, index)
        input_ids.index_copy_(0, hole_pos, source.index_select(0, hole_src))

    qsl_cpu = buffers.query_start_loc_cpu[: n_meta + 1]
    qsl_cpu.numpy()[: r + 1] = query_start
    qsl_cpu.numpy()[r + 1 :] = num_tokens + (0 if empty_pads else np.arange(1, num_pad_reqs + 1))
    seq_cpu = buffers.seq_lens_cpu[:n_meta]
    seq_cpu.numpy()[:r] = seq_lens
    seq_cpu.numpy()[r:] = 0 if empty_pads else 1
    metadata = [
        AttentionMetadata(
            num_actual_tokens=padded if num_pad_reqs else num_tokens,
            max_query_len=max(int(num_scheduled.max()) if num_reqs else 0, 1 if num_pad_reqs else 0),
            max_seq_len=max(int(seq_lens.max()) if num_reqs else 0, 1 if num_pad_reqs else 0),
            query_start_loc=buffers.query_start_loc[: n_meta + 1],
            query_start_loc_cpu=qsl_cpu,
            seq_lens=buffers.seq_lens[:n_meta],
            seq_lens_cpu=seq_cpu,
            block_table=table,
            slot_mapping=slots[:padded],
        )
        for table, slots in zip(block_tables, buffers.slot_mappings, strict=True)
    ]

    sample_rows = np.nonzero(seq_lens >= batch.num_tokens[:num_reqs])[0]
    last = cu[sample_rows] - 1
    sample_drafts = None
    if drafts is not None:
        sample_drafts = [drafts[r] for r in sample_rows.tolist()]
        last = draft_logits_indices(last, sample_drafts)
    logits_indices = stage_and_commit(buffers.logits_indices, last)
    if buffers.copies_done is not None:
        buffers.copies_done.record()
    return StepInputs(
        num_reqs=num_reqs,
        num_tokens=num_tokens,
        num_padded_tokens=padded,
        num_scheduled=num_scheduled,
        query_start=query_start,
        input_ids=input_ids,
        positions=buffers.positions[:padded],
        attn_metadata=metadata,
        sample_rows=sample_rows,
        logits_indices=logits_indices,
        is_decode_only=is_decode_only,
        sample_drafts=sample_drafts,
    )


def gather_input_ids(
    batch: InputBatch,
    computed: np.ndarray,
    num_scheduled: np.ndarray,
    query_start: np.ndarray,
    out: np.ndarray,
) -> None:
    """Write the T input ids of rows [0, R) into `out`: row i's tokens [c[i], c[i] + q[i])."""
    rows = np.arange(len(num_scheduled), dtype=np.int64)
    first = rows * batch.max_model_len + computed - query_start[:-1]  # [R] flat index of token t is first + t
    flat = np.repeat(first, num_scheduled) + np.arange(len(out), dtype=np.int64)
    np.take(batch.token_ids.reshape(-1), flat, out=out)
