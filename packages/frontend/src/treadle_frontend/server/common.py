"""What every route shares: the server state, model-name and sampling-field checks, prompts, usage.
Streams, SSE framing and clients that go away are streams.py's."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from treadle_frontend.async_llm import AsyncLLM
from treadle_frontend.input_processor import keep_last
from treadle_frontend.logprobs import TOKEN_IDS, TokenNames
from treadle_frontend.server.config import ServerConfig
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.lora import ServedLoRAs
from treadle_frontend.server.metrics import ServerMetrics
from treadle_frontend.server.structured import structured_outputs
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams, check_num_logprobs

_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "allowed_token_ids",
    "bad_words",
)


@dataclass
class ServerState:
    llm: AsyncLLM
    config: ServerConfig
    model_name: str  # the id clients must send
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))  # for /v1/models
    loras: ServedLoRAs = field(default_factory=ServedLoRAs)  # LoRA adapters served as models (server/lora.py)
    startup_error: ValueError | None = (
        None  # why start-up failed (a --lora-modules adapter the engine refused)
    )

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every served id, the one responses carry first (vLLM's --served-model-name list)."""
        return (self.model_name, *(n for n in self.config.more_model_names if n != self.model_name))

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names and model not in self.config.model_aliases:
            if self.loras.get(model) is not None:
                return
            served = ", ".join(f"`{n}`" for n in (*self.model_names, *self.loras.requests))
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves {served}.",
                param="model",
                code="model_not_found",
            )

    def lora_request(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the base model)."""
        return self.loras.get(model)

    def token_names(self, asked: bool | None) -> TokenNames:
        """How logprobs name tokens: "token_id:{id}" when the request's return_tokens_as_token_ids (`asked`), else
        the server's flag, says so (vLLM's rule), else their text."""
        as_ids = self.config.return_tokens_as_token_ids if asked is None else asked
        return TOKEN_IDS if as_ids else self.llm.input_processor.token_texts

    def response_model(self, model: str | None) -> str:
        """The `model` a response carries: the adapter's name when one was asked for, else the served name."""
        lora = self.loras.get(model)
        return lora.lora_name if lora is not None else self.model_name


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def check_priority(state: ServerState, priority: int) -> None:
    try:
        state.llm.input_processor.check_priority(priority)
    except ValueError as e:
        raise APIError(400, str(e), param="priority") from None


_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(
    state: ServerState,
    body: Any,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    stop: list[str] | None = None,
    kind: RequestOutputKind,
    logprobs_field: str = "logprobs",
) -> SamplingParams:
    """SamplingParams from a request body: set fields win, unset ones take the model's defaults. `logprobs_field`
    names the body's field `logprobs` came from in errors (chat's top_logprobs)."""
    values: dict[str, Any] = state.llm.input_processor.default_sampling_fields()
    if max_tokens is None:  # unset: generation_config.json's max_new_tokens, else the rest of the context
        max_tokens = state.llm.input_processor.defaults.max_new_tokens
    for name in _SAMPLING_FIELDS:
        v = getattr(body, name, None)
        if v is not None:
            values[name] = v
    if getattr(body, "logit_bias", None):
        values["logit_bias"] = dict(body.logit_bias)
    n = getattr(body, "n", 1)
    if getattr(body, "best_of", None) not in (None, n):
        raise APIError(
            400,
            f"best_of ({body.best_of}) must equal n ({n}): every completion generated is returned (for beam "
            "search, send use_beam_search: true with n beams)",
            param="best_of",
        )
    if stop is None:
        raw = getattr(body, "stop", None)
        stop = [raw] if isinstance(raw, str) else list(raw or [])
    # the engine's max_logprobs, in vLLM's words, naming the request's field
    model = state.llm.input_processor.model
    checks = (("sample", logprobs_field, logprobs), ("prompt", "prompt_logprobs", prompt_logprobs))
    for which, name, value in checks:
        try:
            check_num_logprobs(which, value, model.max_logprobs, model.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param=name) from None
    tokenizer = state.llm.input_processor.tokenizer
    rp = state.config.reply_reasoning_parser(getattr(body, "chat_template_kwargs", None))
    values["structured_outputs"] = structured_outputs(body, tokenizer, rp)
    try:
        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop=stop,
            output_kind=kind,
            **values,
        )
    except TypeError as e:
        raise APIError(400, f"invalid sampling field: {e}") from e
    except ValueError as e:  # SamplingParams' range checks start with the field's name
        field = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=field if field in _PARAM_NAMES else None) from None


REASONING_EFFORTS = ("low", "medium", "high")


def reasoning_effort(effort: Any, param: str) -> dict[str, str]:
    """A request's reasoning effort as the chat template's `reasoning_effort` variable (gpt-oss's template reads
    it; other templates ignore it); none when unset, a 400 naming `param` for anything but low, medium, high."""
    if effort is None:
        return {}
    if effort not in REASONING_EFFORTS:
        raise APIError(400, f"{param} {effort!r} is not one of {', '.join(REASONING_EFFORTS)}", param=param)
    return {"reasoning_effort": effort}


def prompt_list(given: str | list[Any], param: str) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts: a string, a list of strings, one token-id list, or a list of
    token-id lists (`param` names the field in the error for an empty one)."""
    if isinstance(given, str):
        return [given]
    if not given:
        raise APIError(400, f"{param} must not be empty", param=param)
    if all(isinstance(x, int) for x in given):
        return [list(given)]
    return list(given)


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (-1: the last max_model_len); None: all."""
    if keep is None:
        return ids
    if keep != -1 and keep < 1:
        raise APIError(
            400, f"truncate_prompt_tokens must be -1 or >= 1, got {keep}", param="truncate_prompt_tokens"
        )
    return keep_last(ids, keep, max_model_len)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
