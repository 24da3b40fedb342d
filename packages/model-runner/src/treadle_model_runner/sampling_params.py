"""SamplingParams: how one request's next tokens are chosen, validated once at creation.

Every field has vLLM's meaning. Validation raises ValueError naming the field, the value and the allowed
range, so the API server can turn it into an HTTP 400 unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from treadle_model_runner.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5  # temperature at or below this is greedy
DEFAULT_MAX_LOGPROBS = 20  # vLLM's default for the engine's max_logprobs (ModelConfig)


class RequestOutputKind(IntEnum):
    """What the output processor hands back per step."""

    CUMULATIVE = 0  # the whole output so far, every step
    DELTA = 1  # only what is new since the last step
    FINAL_ONLY = 2  # once, when the request finishes


POOLING_TYPES = (None, "last", "mean", "cls")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # <= 1e-5 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # in [0, 1]; 0 = off
    seed: int | None = None  # per-request seed; tokens depend on (seed, position) only
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = off
    logit_bias: dict[int, float] | None = None  # token id -> bias added to the logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # if set, only these tokens may be sampled
    bad_words: list[str] | None = None  # words never generated (tokenized by the frontend)
    bad_words_token_ids: list[list[int]] | None = None  # filled by the frontend from bad_words
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens are generated
    max_tokens: int | None = 16  # None = up to max_model_len
    stop: list[str] = field(default_factory=list)  # stop strings (handled by the frontend)
    stop_token_ids: list[int] = field(default_factory=list)  # extra token ids that end the request
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    # top logprobs per sampled token (0 = only the sampled one, -1 = the whole vocabulary), at most the engine's
    # max_logprobs (check_logprobs_limit)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # top logprobs per prompt token, the same way
    detokenize: bool = True  # False: outputs carry token ids only (text "", logprobs' decoded_token None)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema / regex / choice / grammar
    # Filled by the engine from the model's generation config: token ids that end generation (EOS).
    all_stop_token_ids: set[int] = field(default_factory=set)
    # an embedding request of the frontend's (max_tokens 0: the engine drops the token its prefill samples) also
    # returns the prompt's final hidden states pooled: "last" the last token's, "mean" their mean, "cls" the first
    # token's (runner/pooling.py); None: a generation request
    pooling: str | None = None
    normalize: bool = True  # pooling: L2-normalise the pooled vector (vLLM's PoolingParams.normalize)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        so: Any = self.structured_outputs
        if isinstance(so, dict):
            self.structured_outputs = StructuredOutputsParams(**so)
        self._validate()
        self.all_stop_token_ids = set(self.all_stop_token_ids) | set(self.stop_token_ids)

    # ---- validation -------------------------------------------------------------------------------
    def _validate(self) -> None:
        _check_int("n", self.n, lo=1, hi=128)
        _check_float("temperature", self.temperature, lo=0.0, hi=None)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=0, hi=None)
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=None, lo_open=True)
        _check_int("min_tokens", self.min_tokens, lo=0, hi=None)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=0, hi=None)
            if self.min_tokens > self.max_tokens:
                raise ValueError(
                    f"min_tokens ({self.min_tokens}) must be less than or equal to max_tokens ({self.max_tokens})"
                )
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != -1:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, lo=1, hi=None)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=None, hi=None)
                if value < -1:
                    raise ValueError(f"{name} must be non-negative or -1 (the whole vocabulary), got {value}")
        if self.logit_bias is not None:
            bias: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                try:
                    tok = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias key {k!r} is not a token id (an integer)") from None
                if tok < 0:
                    raise ValueError(f"logit_bias key {tok} must be a non-negative token id")
                _check_float(f"logit_bias[{tok}]", v, lo=-100.0, hi=100.0)
                bias[tok] = float(v)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                raise ValueError("allowed_token_ids must not be empty: no token could be sampled")
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids[]", t, lo=0, hi=None)
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, lo=0, hi=None)
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop must be a list of non-empty strings, got {s!r}")
        if self.stop and not self.detokenize:  # stop strings are matched in the detokenized text
            raise ValueError(
                "stop strings are only supported when detokenize is True. Set detokenize=True to use stop."
            )
        if self.pooling not in POOLING_TYPES:
            raise ValueError(
                f"pooling {self.pooling!r} is not one of None, {', '.join(map(repr, POOLING_TYPES[1:]))}"
            )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.n > 1 and self.is_greedy and self.seed is None:
            pass  # allowed, as in vLLM: n identical greedy completions

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature <= _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_host_tokens(self) -> bool:
        """The runner must know this request's sampled tokens on the host before its next step (penalties and
        bad words read the outputs; prompt logprobs are returned with the step), so its steps are not deferred.
        Structured outputs need them only when the step samples, after its forward is launched, and sampled-token
        logprobs travel with the tokens (runner/sampling.py), so those steps are deferred."""
        return (
            self.needs_penalties
            or bool(self.bad_words_token_ids)
            or self.prompt_logprobs is not None
            or self.pooling is not None  # the embedding is returned with the step
            or self.max_tokens == 0  # prompt only: its row may be full (sampling.py keeps its token out)
        )

    @property
    def needs_whole_prompt(self) -> bool:
        """Every prompt position must be computed for this request (prompt logprobs, and mean or first-token
        pooling read them all), so the engine reads none of its prompt from the prefix cache."""
        return self.prompt_logprobs is not None or self.pooling in ("mean", "cls")

    def check_logprobs_limit(self, max_logprobs: int, vocab_size: int) -> None:
        """vLLM's limit on logprobs and prompt_logprobs: ValueError when either asks for more than the engine's
        max_logprobs (-1 on either side counting as the whole vocabulary; 0 and None always pass)."""
        check_num_logprobs("sample", self.logprobs, max_logprobs, vocab_size)
        check_num_logprobs("prompt", self.prompt_logprobs, max_logprobs, vocab_size)

    def clone(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)  # type: ignore[arg-type]


def num_top_logprobs(value: int | None, vocab_size: int) -> int:
    """Top logprobs to compute for a logprobs / prompt_logprobs value: -1 (the whole vocabulary) and anything above
    the vocabulary are vocab_size; None (none asked) is -1."""
    if value is None:
        return -1
    return vocab_size if value == -1 else min(value, vocab_size)


def logprobs_limit(max_logprobs: int, vocab_size: int) -> int:
    """The most logprobs a request may ask for under the engine's max_logprobs (-1: the whole vocabulary)."""
    return vocab_size if max_logprobs == -1 else max_logprobs


def check_num_logprobs(kind: str, value: int | None, max_logprobs: int, vocab_size: int) -> None:
    """ValueError in vLLM's words when `value` (a request's logprobs, kind "sample", or prompt_logprobs, kind
    "prompt"; -1 = the whole vocabulary) exceeds max_logprobs (-1 = the whole vocabulary)."""
    if not value:
        return
    requested = vocab_size if value == -1 else value
    limit = logprobs_limit(max_logprobs, vocab_size)
    if requested > limit:
        raise ValueError(
            f"Requested {kind} logprobs of {requested}, which is greater than max allowed: {limit}. Ask for at "
            f"most {limit}, or start the engine with a larger max_logprobs (LLM(max_logprobs=...), treadle serve "
            "--max-logprobs; -1 allows the whole vocabulary)"
        )


def _check_int(name: str, value: object, *, lo: int | None, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    _check_range(name, value, lo, hi, lo_open=False)


def _check_float(
    name: str, value: object, *, lo: float | None, hi: float | None, lo_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    _check_range(name, value, lo, hi, lo_open=lo_open)


def _check_range(name: str, value: float, lo: float | None, hi: float | None, *, lo_open: bool) -> None:
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        left = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name} must be in {left}{lo_s}, {hi_s}], got {value}")
