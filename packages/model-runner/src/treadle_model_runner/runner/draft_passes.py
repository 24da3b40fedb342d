"""Planning a draft model's passes 1..k of a step (draft_model.py): which rows draft and how far, and every row's
position in each pass, uploaded before the passes are queued."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from treadle_model_runner.outputs import ModelRunnerOutput
from treadle_model_runner.runner.inputs import StepInputs

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

__all__ = ["Passes", "drafting_rows", "plan_passes"]


class Passes(NamedTuple):
    """The draft passes of one step, planned on the host and uploaded: rows that draft, drafts each may get, and
    every row's position in each pass ([passes, R])."""

    rows: np.ndarray
    caps: np.ndarray
    positions: np.ndarray
    device_positions: torch.Tensor
    device_rows: torch.Tensor
    device_caps: torch.Tensor


def drafting_rows(
    runner: ModelRunner, inputs: StepInputs, output: ModelRunnerOutput, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(batch rows that draft after this step, drafts each may get): rows that sampled a token and may still
    produce more than one, capped by `k`, max_model_len, max_tokens and their allocated slots."""
    batch = runner.batch
    rows = inputs.sample_rows
    if not rows.size:
        return rows, rows
    num_tokens = batch.num_tokens[rows].astype(np.int64)
    block_size = batch.block_tables[0].block_size
    slots = np.min([table.num_blocks[rows] for table in batch.block_tables], axis=0) * block_size
    left = np.array(
        [
            s.sampling_params.max_tokens - len(s.output_token_ids)
            if s is not None and s.sampling_params.pooling is None
            else 0
            for s in (batch.states[r] for r in rows.tolist())
        ],
        dtype=np.int64,
    )
    caps = np.minimum.reduce(
        [
            np.full(rows.size, k, dtype=np.int64),
            left - 1,  # the token after the drafts is the step's own sample
            batch.max_model_len - num_tokens - 1,
            slots.astype(np.int64) - num_tokens + 1,
        ]
    )
    has = np.array([bool(output.sampled_token_ids[r]) for r in rows.tolist()], dtype=bool)
    keep = (caps > 0) & has
    return rows[keep], caps[keep]


def plan_passes(runner: ModelRunner, rows: np.ndarray, caps: np.ndarray, last: np.ndarray) -> Passes:
    """Passes 1..k for `rows` (at most `caps` drafts each); `last`: each row's last position this step, which a
    row that does not draft runs again."""
    num_passes = int(caps.max())
    # drafting rows: their last sampled token's position
    first = runner.batch.num_tokens[rows].astype(np.int64) - 1
    # [passes, R] each row's position in each pass: a drafting row moves on from `first` and repeats its last
    # pass once past its cap; any other row runs its last position of the step again (the same KV written)
    positions = np.repeat(last[None, :], num_passes, axis=0)
    positions[:, rows] = first[None, :] + np.minimum(np.arange(num_passes)[:, None], caps[None, :] - 1)
    device = runner.device
    return Passes(
        rows, caps, positions, torch.from_numpy(positions).to(device), torch.from_numpy(rows).to(device),
        torch.from_numpy(caps).to(device),
    )  # fmt: skip
