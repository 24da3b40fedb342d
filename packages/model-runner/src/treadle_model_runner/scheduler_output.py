"""SchedulerOutput: what the scheduler asks the model runner to run in one step.

The runner keeps persistent per-request state, so the scheduler sends each request in full only once
(`NewRequestData`, also when a preempted request is resumed) and afterwards only the diff
(`CachedRequestData`: new block ids and the updated num_computed_tokens). Tokens the runner sampled itself
are already in its state; it appends them when it samples.

Invariants the runner relies on:
- every request in `num_scheduled_tokens` is either in `scheduled_new_reqs` or in `scheduled_cached_reqs`;
- `num_computed_tokens + num_scheduled_tokens[req_id] <= len(all tokens known to the runner) + 1`
  (a decode step schedules exactly the one token sampled last step);
- the blocks in `block_ids` (per KV-cache group) cover `num_computed_tokens + num_scheduled_tokens` slots;
- `finished_req_ids` and `preempted_req_ids` are dropped from the runner's state before this step runs;
- a request in `scheduled_spec_decode_tokens` is decoding: num_computed_tokens == its known tokens - 1 and
  num_scheduled_tokens == 1 + len(drafts); the blocks cover the draft slots too. The runner's output for it
  is 1 to 1 + len(drafts) tokens; the scheduler then sets num_computed_tokens to what was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen (or a resumed, preempted one): its full data, once."""

    req_id: str
    prompt_token_ids: list[int]  # the prompt
    sampling_params: SamplingParams
    block_ids: tuple[list[int], ...]  # per KV-cache group: physical block ids, in logical order
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix hit or earlier chunks)
    output_token_ids: list[int] = field(default_factory=list)  # tokens generated before a preemption
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)


@dataclass(slots=True)
class CachedRequestData:
    """Requests the runner already holds: only what changed since their last step (parallel lists)."""

    req_ids: list[str] = field(default_factory=list)
    # blocks appended per group since the last step (None = no new blocks)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # tokens in the KV cache before this step

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to compute this step
    total_num_scheduled_tokens: int  # sum of num_scheduled_tokens
    finished_req_ids: set[str] = field(default_factory=set)  # finished or aborted since last step: drop them
    preempted_req_ids: set[str] = field(default_factory=set)  # preempted this step: drop their rows
    # request id -> draft tokens to verify this step (speculative decoding; decoding requests only). Such a
    # request's num_scheduled_tokens is 1 + len(drafts): its last sampled token, then the drafts. The runner
    # samples at all 1 + len(drafts) positions and returns the longest prefix of samples that follows the
    # drafts: each draft kept while it equals the sample at its position, then one sample more.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> SchedulerOutput:
        return cls([], CachedRequestData(), {}, 0)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0
