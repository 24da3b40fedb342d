"""ModelRunnerOutput: what came out of one step, as plain Python lists (already on the host)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # request id -> its embedding (SamplingParams.pooling), in the step that computed its last prompt token
    pooled: dict[str, list[float]] = field(default_factory=dict)
    # request id -> the draft model's proposals after this step's tokens (speculative_config draft_model)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> ModelRunnerOutput:
        return cls([], {}, [])

    def get_output(self) -> ModelRunnerOutput:
        """Already on the host (the same call as AsyncModelRunnerOutput's, so callers need not tell them apart)."""
        return self


class AsyncModelRunnerOutput:
    """A step's output whose sampled tokens are still being copied to the host (async scheduling).

    The runner returns it without waiting for the device; `get_output()` blocks until the step's token copy
    has landed and builds the ModelRunnerOutput. It reads only its own pinned buffer, so the engine may call
    it from another thread while the runner already prepares the next step.
    """

    def __init__(
        self, req_ids: list[str], sample_rows: list[int], tokens: Any, wait: Any, logprobs: Any = None
    ) -> None:
        self.req_ids = req_ids
        self.sample_rows = sample_rows  # index in req_ids of each sampled token
        self._tokens = tokens  # pinned host tensor [S], valid once wait() returned
        self._wait = wait
        self._logprobs = logprobs  # None, or () -> [S] Logprobs | None per sampled token, valid after wait()

    def get_output(self) -> ModelRunnerOutput:
        self._wait()
        tokens = self._tokens.tolist()
        per_token: list[Logprobs | None] = (
            self._logprobs() if self._logprobs is not None else [None] * len(tokens)
        )
        sampled: list[list[int]] = [[] for _ in self.req_ids]
        logprobs: list[list[Logprobs] | None] = [None] * len(self.req_ids)
        for j, i in enumerate(self.sample_rows):
            sampled[i] = [tokens[j]]
            if (lp := per_token[j]) is not None:
                logprobs[i] = [lp]
        return ModelRunnerOutput(
            req_ids=self.req_ids,
            req_id_to_index={r: i for i, r in enumerate(self.req_ids)},
            sampled_token_ids=sampled,
            logprobs=logprobs,
        )
