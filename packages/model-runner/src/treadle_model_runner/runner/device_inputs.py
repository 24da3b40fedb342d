"""Step inputs built on the device from per-request counts: the persistent buffers and the vectorized math.

The host uploads, packed in one int32 array and one non-blocking copy, q[i] (tokens scheduled for batch row i),
c[i] (tokens computed before the step) and the T input ids it knows. The device derives everything T-sized
with vectorized torch, no Python per token:
    query_start_loc = [0, cumsum(q)]          req_idx[t] = row of token t  (repeat_interleave, output_size=T)
    positions[t]    = c[req_idx[t]] + t - query_start_loc[req_idx[t]]      seq_lens = c + q
    slot_mapping[t] = table[req_idx[t], positions[t] // bs] * bs + positions[t] % bs   (per KV-cache group)
Tokens in [T, padded) are padding: id 0, position 0, slot -1; decode-graph padding requests have query length
1 and context 1, verify and mixed graphs' none.

Invariants: nothing here waits for the device (no .item(), .tolist(), .cpu(), boolean masks, nonzero, or
repeat_interleave without output_size), so the host runs ahead of the GPU. The device buffers are allocated once
and written in place (out=, copy_, fill_), never rebound: CUDA graphs captured on them read each step's values.
The pinned staging memory must not be rewritten before the copies reading it ran (`copies_done`).
"""

from __future__ import annotations

import numpy as np
import torch

from treadle_model_runner.runner.block_table import BlockTable


class StepBuffers:
    """Persistent host staging (pinned on CUDA) and device buffers for one step's inputs."""

    def __init__(self, max_num_tokens: int, max_num_reqs: int, num_groups: int, device: torch.device) -> None:
        pin = device.type == "cuda"

        def pair(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(n, dtype=dtype, pin_memory=pin), torch.zeros(n, dtype=dtype, device=device)

        def on_device(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device)

        self.device = device
        # uploaded every step, packed: [num_scheduled (R) | num_computed (R) | input ids (T)] int32
        self.upload = pair(2 * max_num_reqs + max_num_tokens, torch.int32)
        # host copies of the attention metadata the backends plan from (FlashInfer); never copied to the device
        self.query_start_loc_cpu = torch.zeros(max_num_reqs + 1, dtype=torch.int32)
        self.seq_lens_cpu = torch.zeros(max_num_reqs, dtype=torch.int32)
        # what the model and the CUDA graphs read
        self.input_ids = on_device(max_num_tokens, torch.int64)  # [padded]
        self.positions = on_device(max_num_tokens, torch.int64)  # [padded]
        self.query_start_loc = on_device(max_num_reqs + 1, torch.int32)  # [reqs + 1]; entry 0 stays 0
        self.seq_lens = on_device(max_num_reqs, torch.int32)  # [reqs]
        self.slot_mappings = [on_device(max_num_tokens, torch.int64) for _ in range(num_groups)]  # [padded]
        self.arange = torch.arange(max(max_num_tokens, max_num_reqs) + 1, dtype=torch.int64, device=device)
        self.logits_indices = pair(max_num_tokens, torch.int64)  # a row verifying drafts computes several
        # input tokens sampled by the step in flight (async output): their token index and source index
        self.hole_positions = pair(max_num_reqs, torch.int64)
        self.hole_sources = pair(max_num_reqs, torch.int64)
        # set after the step's host->device copies: pinned host memory (these buffers, the block tables' staging)
        # must not be rewritten before the copies reading it ran (a step that samples nothing never syncs)
        self.copies_done = torch.cuda.Event() if device.type == "cuda" else None

    def wait_for_copies(self) -> None:
        """Block until the previous step's non-blocking copies from pinned host memory have run."""
        if self.copies_done is not None:
            self.copies_done.synchronize()


def commit(buffers: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
    """Copy the first n staged host values to the device (non-blocking); returns the device view."""
    host, dev = buffers
    dev[:n].copy_(host[:n], non_blocking=True)
    return dev[:n]


def stage_and_commit(buffers: tuple[torch.Tensor, torch.Tensor], values: np.ndarray) -> torch.Tensor:
    """Write `values` into the pinned staging buffer and `commit` them; returns the device view."""
    buffers[0].numpy()[: values.size] = values
    return commit(buffers, values.size)


def compute_on_device(
    buffers: StepBuffers,
    tables: list[BlockTable],
    num_reqs: int,
    num_tokens: int,
    num_padded_tokens: int,
    num_pad_reqs: int,
    empty_pads: bool = False,
) -> None:
    """From the uploaded q, c and ids (already copied into `buffers.upload[1]`), write the step's device inputs:
    input_ids and positions [padded], query_start_loc [reqs + pads + 1], seq_lens [reqs + pads], and the slot
    mapping of every group [padded]. The block tables must be committed first. Padding requests have one token
    each (decode graphs), or none with `empty_pads` (verify and mixed graphs)."""
    r, t, p = num_reqs, num_tokens, num_pad_reqs
    uploaded = buffers.upload[1]
    q, c, ids = uploaded[:r], uploaded[r : 2 * r], uploaded[2 * r : 2 * r + t]  # int32
    qsl, seq_lens = buffers.query_start_loc, buffers.seq_lens
    torch.cumsum(q, 0, dtype=torch.int32, out=qsl[1 : r + 1])
    if empty_pads:
        qsl[r + 1 : r + p + 1].fill_(t)
    else:
        torch.add(buffers.arange[1 : p + 1], t, out=qsl[r + 1 : r + p + 1])
    torch.add(c, q, out=seq_lens[:r])
    seq_lens[r : r + p].fill_(0 if empty_pads else 1)

    req_idx = torch.repeat_interleave(q, output_size=t)  # [T] int32 batch row of each token (no sync)
    first_position = c - qsl[:r]  # [R] int32: position of token t is first_position[row] + t
    positions = buffers.positions[:t]
    torch.add(first_position.index_select(0, req_idx), buffers.arange[:t], out=positions)
    buffers.positions[t:num_padded_tokens].zero_()
    buffers.input_ids[:t].copy_(ids)
    buffers.input_ids[t:num_padded_tokens].zero_()

    write_slot_mappings(buffers, tables, req_idx, positions)
    for slots in buffers.slot_mappings:
        slots[t:num_padded_tokens].fill_(-1)


def write_slot_mappings(
    buffers: StepBuffers, tables: list[BlockTable], rows: torch.Tensor, positions: torch.Tensor
) -> None:
    """Every group's slot mapping of n tokens (its first n entries): token i at `positions[i]` of batch row
    `rows[i]` goes to slot table[row, position // block_size] * block_size + position % block_size."""
    n = positions.shape[0]
    for table, slots in zip(tables, buffers.slot_mappings, strict=True):
        bs = table.block_size
        flat = rows * table.max_blocks_per_req + torch.div(positions, bs, rounding_mode="floor")  # int64
        block_ids = table.device_table.view(-1).index_select(0, flat).to(torch.int64)  # [n]
        torch.add(block_ids * bs, torch.remainder(positions, bs), out=slots[:n])


def move_decode_positions(
    buffers: StepBuffers, tables: list[BlockTable], positions: torch.Tensor, seq_lens_cpu: np.ndarray
) -> None:
    """Move a decode batch already in the buffers (one token per row, rows [0, R)) to new `positions` [R] int64
    on the device: positions, seq_lens and every group's slot mapping, on the device with no host copy (a draft
    model's passes, runner/draft_model.py); `seq_lens_cpu` [R] is the host copy of the new seq_lens. Padding
    rows past R keep theirs."""
    r = positions.shape[0]
    buffers.positions[:r].copy_(positions)
    torch.add(positions, 1, out=buffers.seq_lens[:r])
    buffers.seq_lens_cpu.numpy()[:r] = seq_lens_cpu
    write_slot_mappings(buffers, tables, buffers.arange[:r], positions)
