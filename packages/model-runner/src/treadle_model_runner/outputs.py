"""ModelRunnerOutput: what came out of one step, as plain Python lists (already on the host)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprobs:
    """Logprobs of one position: the chosen token first, then the top-k tokens (parallel lists)."""

    token_ids: list[int]  # [chosen, top1, ..., topk]
    logprobs: list[float]  # natural-log probabilities of the raw model logits (vLLM v1 default)
    chosen_rank: int  # 1-based rank of the chosen token among all tokens (1 = most likely)


@dataclass(slots=True)
class ModelRunnerOutput:
    req_ids: list[str]  # requests scheduled this step, in batch order
    req_id_to_index: dict[str, int]  # request id -> index in req_ids
    sampled_token_ids: list[list[int]]  # per request: the new tokens ([] while a prefill chunk is partial)
    logprobs: list[list[Logprobs] | None] = field(default_factory=list)  # per request, per sampled token
    # request id -> logprobs of prompt positions computed this step (position i scores prompt token i+1)
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> ModelRunnerOutput:
        return cls([], {}, [])
