"""Applying a SchedulerOutput's diff to the runner's persistent state, before the step runs.

Order matters: drop finished and preempted requests; record new requests in full; apply cached requests' diffs
(num_computed_tokens, appended block ids) to their state and, if they hold a row, to the row; remove rows of
requests not scheduled this step (their state stays); give every scheduled request without a row one; condense.
Afterwards rows [0, num_reqs) are exactly the scheduled requests.
"""

from __future__ import annotations

from treadle_model_runner.runner.input_batch import InputBatch
from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.scheduler_output import SchedulerOutput


def apply_scheduler_output(batch: InputBatch, requests: dict[str, RequestState], so: SchedulerOutput) -> None:
    for req_id in so.finished_req_ids | so.preempted_req_ids:
        requests.pop(req_id, None)
        batch.remove(req_id)

    for new in so.scheduled_new_reqs:
        batch.remove(new.req_id)  # a resumed request starts over from its full data
        requests[new.req_id] = RequestState(
            req_id=new.req_id,
            prompt_token_ids=list(new.prompt_token_ids),
            sampling_params=new.sampling_params,
            block_ids=tuple(list(ids) for ids in new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            output_token_ids=list(new.output_token_ids),
            lora_request=new.lora_request,
        )

    cached = so.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        state = requests.get(req_id)
        if state is None:
            raise ValueError(
                f"scheduled cached request {req_id!r} is unknown to the runner (never sent as new)"
            )
        state.num_computed_tokens = cached.num_computed_tokens[i]
        new_blocks = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
        row = batch.req_id_to_row.get(req_id)
        if new_blocks is not None:
            for group, ids in enumerate(new_blocks):
                state.block_ids[group].extend(ids)
                if row is not None and ids:
                    batch.block_tables[group].append(row, ids)
        if row is not None:
            batch.num_computed_tokens[row] = state.num_computed_tokens

    for req_id in list(batch.req_id_to_row):
        if req_id not in so.num_scheduled_tokens:
            batch.remove(req_id)
    for req_id in so.num_scheduled_tokens:
        if req_id not in batch:
            state = requests.get(req_id)
            if state is None:
                raise ValueError(f"request {req_id!r} is scheduled but was never sent as a new request")
            batch.add(state)
    batch.condense()
