"""RequestState: what the runner remembers about a live request between steps (also while it is unscheduled)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestState:
    req_id: str
    prompt_token_ids: list[int]  # the prompt
    sampling_params: SamplingParams
    block_ids: tuple[list[int], ...]  # per KV-cache group: physical block ids in logical order
    num_computed_tokens: int  # tokens with KV in the cache before the current step
    output_token_ids: list[int] = field(default_factory=list)  # tokens sampled so far
    grammar: Any = None  # structured outputs: its xgrammar matcher (None: not built yet; False: abandoned)
    grammar_accepted: int = 0  # output tokens the matcher has accepted
    grammar_ended: bool = False  # the matcher accepted a stop token: the grammar allows nothing more
    lora_request: LoRARequest | None = None  # its adapter (None: the base model)
    # "mean" pooling: the float32 sum of the prompt positions' final hidden states computed so far; "cls": the
    # first position's ([hidden_size], on the device; runner/pooling.py)
    pooling_acc: Any = None
    # speculative draft model: positions [0, draft_kv_end) hold the draft's KV for the tokens the next step
    # schedules there (runner/draft_model.py)
    draft_kv_end: int = 0

    @property
    def lora_id(self) -> int:
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
