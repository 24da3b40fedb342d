"""Speculative decoding in the runner: one step verifies a request's draft tokens.

The scheduler sends drafts d1..dk for a decoding request (`SchedulerOutput.scheduled_spec_decode_tokens`) and
schedules 1 + k tokens for it: its last sampled token, then the drafts, at consecutive positions. The runner
  - writes the drafts into the request's row of the token table just past its known tokens (`stage_drafts`), so
    the input gather reads them like any scheduled token while num_tokens still counts only real ones;
  - computes logits at all 1 + k positions (`draft_logits_indices`) and samples each with the whole sampler,
    offset j as if d1..dj were outputs already (sample/drafts.py: penalties, min_tokens, bad words and the seeded
    noise's position advance; runner/structured.py: the grammar follows the drafts);
  - keeps s_0..s_m, where s_j is the sample at offset j and m the first j with s_j != d_{j+1} (m = k when every
    draft matched: s_k is the bonus token), and appends them as the request's new tokens (`accepted_runs`).
Why it is exact: sampling is Gumbel-max, so a draft is kept iff it is the target's own sample at its position,
with probability p(d), and a rejected position's sample is distributed as p restricted to tokens != d: the
rejection sampler for a one-hot (n-gram) draft. Greedy and seeded requests (noise keyed by seed and position)
give the very tokens of a run without drafts; unseeded rows draw independent noise at every position.

A step with drafts is never decode-only (a request has 1 + k tokens), so it never replays a one-token-per-request
decode graph: it replays a verify graph of N requests of at most 1 + k tokens (batch_graphs.py), or runs
through the mixed-batch path (piecewise graphs, the one-request prefill graphs, or eagerly). Its
sampled tokens are needed on the host at once, so it is never deferred (under async output that step's output is
synchronous; the engine schedules it with no other step in flight). Stopping at EOS or a stop token inside the
kept tokens is the scheduler's job.
"""

from __future__ import annotations

import numpy as np

from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.sample.drafts import concat_ranges
from treadle_model_runner.scheduler_output import SchedulerOutput


def stage_drafts(
    batch: InputBatch, so: SchedulerOutput, num_scheduled: np.ndarray, vocab_size: int
) -> list[list[int]] | None:
    """Per batch row: the drafts it verifies this step ([] for most), written past its known tokens; None when
    no request of the step has any. ValueError when the scheduler breaks the contract of scheduler_output.py."""
    spec = so.scheduled_spec_decode_tokens
    if not any(spec.values()):
        return None
    drafts: list[list[int]] = [[] for _ in range(len(num_scheduled))]
    for req_id, tokens in spec.items():
        if not tokens:
            continue
        row = batch.req_id_to_row.get(req_id)
        state = batch.states[row] if row is not None else None
        if row is None or state is None:
            raise ValueError(f"drafts for request {req_id!r}, which is not scheduled this step")
        k, known = len(tokens), int(batch.num_tokens[row])
        if int(num_scheduled[row]) != 1 + k or int(batch.num_computed_tokens[row]) != known - 1:
            raise ValueError(
                f"request {req_id!r} verifies {k} drafts, so it must be decoding with 1 + {k} tokens scheduled: "
                f"got {int(num_scheduled[row])} scheduled, {int(batch.num_computed_tokens[row])} computed of "
                f"{known} known tokens"
            )
        if state.sampling_params.pooling is not None:
            raise ValueError(f"request {req_id!r} asks for pooling, which takes no drafts")
        if known + k >= batch.max_model_len:
            raise ValueError(
                f"request {req_id!r} has {known} tokens: {k} drafts and the token after them would pass "
                f"max_model_len ({batch.max_model_len}); propose at most {batch.max_model_len - known - 1}"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(
                f"drafts of request {req_id!r} hold token ids outside [0, {vocab_size}): {tokens}"
            )
        batch.token_ids[row, known : known + k] = ids
        drafts[row] = list(tokens)
    return drafts


def draft_logits_indices(last: np.ndarray, drafts: list[list[int]]) -> np.ndarray:
    """Token indices to compute logits at: for sampling row i (its last scheduled token at `last[i]`), its
    1 + len(drafts[i]) last tokens, in order."""
    num_drafts = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=len(drafts))
    return concat_ranges(last - num_drafts, num_drafts + 1)


def accepted_runs(tokens: np.ndarray, drafts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(first, count) [S] each: sampling row i's samples are tokens[first[i] : first[i] + 1 + len(drafts[i])]; it
    keeps the first count[i] of them, up to and including the first that differs from the draft it follows."""
    num_drafts = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=len(drafts))  # [S]
    reps = num_drafts + 1
    first = np.cumsum(reps) - reps
    row = np.repeat(np.arange(len(drafts)), reps)  # [E] sampling row of each sample
    offset = np.arange(row.size) - first[row]  # [E] j
    follows = np.full(row.size, -1, dtype=np.int64)  # [E] d_{j+1}; -1 after the last draft (never matches)
    follows[offset < num_drafts[row]] = np.fromiter(
        (t for d in drafts for t in d), dtype=np.int64, count=int(num_drafts.sum())
    )
    mismatch = np.where(tokens != follows, offset, reps[row])  # [E] offset where it stops, else past the end
    return first, np.minimum.reduceat(mismatch, first) + 1
