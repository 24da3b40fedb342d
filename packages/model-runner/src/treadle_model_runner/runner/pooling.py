"""Pooling: an embedding request's vector, from its prompt's final hidden states (SamplingParams.pooling).

- "last": the last prompt token's state, read in the step that samples the request's first token;
- "mean": the mean of every prompt token's state. A long prompt is prefilled in chunks over several steps, so each
  step adds the states of the prompt positions it computed to the request's running float32 sum (RequestState.
  pooling_acc), and the step that samples its first token divides by the prompt's length;
- "cls": the first prompt token's state, kept from the step that computes position 0.
The vector is L2-normalised in float32 unless the request's `normalize` is off.

"mean" and "cls" need every prompt position computed by the request itself: the engine reads none of their prompt
from the prefix cache (SamplingParams.needs_whole_prompt). A preempted request comes back as a new request and
starts over, with a new RequestState and so a new sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from treadle_model_runner.runner.inputs import StepInputs

if TYPE_CHECKING:
    from treadle_model_runner.runner.input_batch import InputBatch
    from treadle_model_runner.runner.request_state import RequestState


def accumulate(batch: InputBatch, inputs: StepInputs, hidden: torch.Tensor) -> None:
    """Adds this step's prompt positions to each scheduled "mean" request's sum, and keeps a "cls" request's
    first position when this step computes it. `hidden`: [tokens of the step, hidden_size], read at once (a CUDA
    graph reuses its output buffer)."""
    for row in range(inputs.num_reqs):
        state = batch.states[row]
        if state is None or state.sampling_params.pooling not in ("mean", "cls"):
            continue
        start = int(batch.num_computed_tokens[row])
        end = min(start + int(inputs.num_scheduled[row]), int(batch.num_prompt_tokens[row]))
        if end <= start:
            continue  # a decode step: no prompt position in it
        first = int(inputs.query_start[row])
        if state.sampling_params.pooling == "mean":
            chunk_sum = hidden[first : first + end - start].float().sum(dim=0)  # [hidden_size]
            state.pooling_acc = chunk_sum if state.pooling_acc is None else state.pooling_acc + chunk_sum
        elif start == 0:
            state.pooling_acc = hidden[first].float().clone()  # [hidden_size]


def pooled(
    states: list[RequestState | None], rows: np.ndarray, req_ids: list[str], last_hidden: torch.Tensor
) -> dict[str, list[float]]:
    """Embeddings of the sampling rows whose request asked for one and samples its first token now; {} at once
    when none did. `last_hidden`: [sampling rows, hidden_size], each row's last scheduled token's state."""
    wanted = [
        j
        for j, s in enumerate(states)
        if s is not None and s.sampling_params.pooling and not s.output_token_ids
    ]
    if not wanted:
        return {}
    vectors = []
    for j in wanted:
        state = states[j]
        assert state is not None
        params = state.sampling_params
        if params.pooling == "last":
            vector = last_hidden[j].float()
        else:
            assert state.pooling_acc is not None, (
                f"request {state.req_id} has no {params.pooling} pooling state"
            )
            vector = state.pooling_acc
            if params.pooling == "mean":
                vector = vector / len(state.prompt_token_ids)
            state.pooling_acc = None
        vectors.append(torch.nn.functional.normalize(vector, dim=-1) if params.normalize else vector)
    values = torch.stack(vectors).tolist()
    return {req_ids[int(rows[j])]: v for j, v in zip(wanted, values, strict=True)}
