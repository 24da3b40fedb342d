"""Request: the engine's mutable record of one generation, from arrival to its finish reason.

Theory. A request is a token list that grows: `all_token_ids = prompt + output`. The scheduler only asks how
many of those tokens already have KV in the cache (`num_computed_tokens`) and how many exist
(`num_tokens`, plus `num_output_placeholders` under async scheduling: tokens scheduled for sampling whose
ids have not come back yet). There is no prefill or decode state; a prefill is simply a request whose
`num_computed_tokens` lags far behind `num_tokens`.

Invariants:
- `0 <= num_computed_tokens <= num_tokens + num_output_placeholders`;
- `all_token_ids == prompt_token_ids + output_token_ids` at all times;
- `block_hashes[i]` is the chained hash of full block i of `all_token_ids` (filled lazily by the KV cache
  manager; never covers a partial block);
- a finished request never changes again.
"""

from __future__ import annotations

import enum

from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    """Why a request ended. Sent over the wire as an int; `str()` gives the OpenAI spelling."""

    STOP = 0  # EOS or a stop token (stop strings are the frontend's)
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the client
    ERROR = 3  # the engine failed while the request was in flight

    def __str__(self) -> str:
        return self.name.lower()


class RequestStatus(enum.IntEnum):
    WAITING = 0  # in the waiting queue, holds no KV blocks
    RUNNING = 1  # scheduled at least once since it last left the waiting queue; holds blocks
    PREEMPTED = 2  # was running, blocks taken back; waits to be recomputed
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Request:
    __slots__ = (
        "all_token_ids",
        "arrival_time",
        "block_hashes",
        "cache_salt",
        "lora_generation",
        "lora_request",
        "max_tokens",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_output_placeholders",
        "num_preemptions",
        "num_prompt_tokens",
        "output_token_ids",
        "priority",
        "prompt_token_ids",
        "request_id",
        "sampling_params",
        "status",
        "stop_reason",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float,
        priority: int = 0,
        cache_salt: str | None = None,
        max_model_len: int | None = None,
        lora_request: LoRARequest | None = None,
        lora_generation: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids  # never mutated
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time  # seconds (time.time() of the client)
        self.priority = priority  # lower value = served first under the priority policy
        self.cache_salt = cache_salt  # isolates this request's prefix-cache entries from other salts
        self.lora_request = lora_request  # its LoRA adapter (None: the base model)
        # how many times that adapter was reloaded in place before this request arrived (prefix-cache key)
        self.lora_generation = lora_generation
        self.num_prompt_tokens = len(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or scheduled to be, this step)
        self.num_output_placeholders = 0  # async scheduling: sampled-but-not-yet-returned tokens
        self.num_cached_tokens = -1  # prefix-cache hit of the first scheduling; -1 = not scheduled yet
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks (see block_hash.py)
        self.stop_reason: int | str | None = None  # the stop token id that ended it, if any
        # Most output tokens it may produce: max_tokens, or the rest of the context when max_tokens is None.
        max_tokens = sampling_params.max_tokens
        if max_tokens is None:
            max_tokens = (max_model_len - self.num_prompt_tokens) if max_model_len is not None else 1 << 62
        self.max_tokens: int = max_tokens

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def lora_id(self) -> int:
        """Its LoRA adapter's id (0: the base model)."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    # ---- state ------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.status)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )


def validate_request_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """Raise ValueError (HTTP 400) for a request that can never fit max_model_len (API.md's message)."""
    if num_prompt_tokens == 0:
        raise ValueError("The prompt is empty: it must contain at least one token.")
    completion = 1 if max_tokens is None else max_tokens
    if num_prompt_tokens + completion > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + completion} tokens ({num_prompt_tokens} in the messages, {completion} in "
            "the completion). Please reduce the length of the messages or completion."
        )


def check_vocabulary(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
    """ValueError naming the field when a token id the model would index with is outside [0, vocab_size): the
    prompt's, logit_bias keys, allowed_token_ids, bad words. Out-of-vocabulary stop_token_ids are harmless
    (never sampled) and allowed, as vLLM allows them."""
    if prompt_token_ids and not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < vocab_size:
        bad = next(t for t in prompt_token_ids if not 0 <= t < vocab_size)
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    fields = (
        ("logit_bias", (params.logit_bias or {}).keys()),
        ("allowed_token_ids", params.allowed_token_ids or ()),
        ("bad_words", [t for word in params.bad_words_token_ids or () for t in word]),
    )
    for name, ids in fields:
        for t in ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"{name} contains token id {t}, outside the vocabulary [0, {vocab_size})")
