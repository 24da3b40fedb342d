"""InputProcessor: prompts (text, token ids or chat messages) + SamplingParams -> engine requests.

Steps: render chat messages through the chat template; tokenize (chat text without extra special tokens,
since the template already placed them); validate every token id against the vocabulary and the total length
against max_model_len with OpenAI's message, and logprobs against the engine's max_logprobs with vLLM's; fill
`max_tokens=None` with the rest of the context; fan a request with `n > 1` out into n child requests
`"{i}_{request_id}"` (child i gets seed + i, so seeded children differ but stay reproducible; only child 0
computes prompt logprobs).

Every problem raises ValueError with a message a user can act on (HTTP 400 in the server).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from treadle_engine_core.request import check_vocabulary
from treadle_frontend.detokenizer import TokenDecoder
from treadle_frontend.logprobs import TokenTexts
from treadle_frontend.output_processor import ParentRequest
from treadle_frontend.request_state import RequestState
from treadle_frontend.tokenizer import ChatTemplateError, GenerationDefaults
from treadle_model_runner.config import PoolerConfig
from treadle_model_runner.sampling_params import DEFAULT_MAX_LOGPROBS, SamplingParams

# A prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids} like vLLM.
PromptType = str | list[int] | dict[str, Any]


class TextPrompt(TypedDict):
    """vLLM's prompt dict of text."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's prompt dict of token ids."""

    prompt_token_ids: list[int]


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served model name
    path: Path | None  # the HF-format model directory
    max_model_len: int  # context length in tokens (prompt + output)
    vocab_size: int  # valid token ids are [0, vocab_size)
    kv_capacity_tokens: int | None = None  # KV cache size in tokens, when the engine reported it
    runtime: dict[str, str] = field(default_factory=dict)  # the engine's device, dtypes, graphs...
    scheduling_policy: str = "fcfs"  # the engine's; priorities other than 0 need "priority"
    # the engine's max_logprobs: most logprobs / prompt_logprobs a request may ask for; -1 = the whole vocabulary
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    pooler: PoolerConfig = field(
        default_factory=PoolerConfig
    )  # how embeddings pool the prompt (--pooler-config)
    num_speculative_tokens: int = 0  # most draft tokens per request per step (0: no speculative decoding)
    model_type: str | None = None  # config.json's model_type ("gpt_oss" picks the harmony reply parser)


def keep_last(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (-1: the last max_model_len); None: all."""
    return ids if keep is None else ids[-(max_model_len if keep == -1 else keep) :]


def embedding_params(pooler: PoolerConfig | None = None, normalize: bool | None = None) -> SamplingParams:
    """A request for its prompt's embedding, pooled as `pooler` says (None: last token, L2-normalised); `normalize`
    (a request's own) overrides the pooler's. Prompt only (max_tokens 0), so an input may fill the whole context;
    the token the prefill step samples is dropped by the engine."""
    pooler = pooler or PoolerConfig()
    return SamplingParams(
        temperature=0.0, max_tokens=0, ignore_eos=True, pooling=pooler.pooling_type.lower(),
        normalize=pooler.normalize if normalize is None else normalize,
    )  # fmt: skip


def context_length_error(max_model_len: int, num_prompt: int, num_completion: int) -> ValueError:
    return ValueError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{num_prompt + num_completion} tokens ({num_prompt} in the messages, {num_completion} in the completion)."
    )


def flatten_content(content: Any) -> str:
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts, one per line."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") and "text" in part:
                parts.append(str(part["text"]))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"message content part of type {kind!r} is not supported; send text parts")
        return "\n".join(parts)  # as vLLM joins text parts
    raise ValueError(
        f"message content must be a string or a list of text parts, got {type(content).__name__}"
    )


class InputProcessor:
    def __init__(
        self,
        tokenizer: Any,
        model: ModelInfo,
        defaults: GenerationDefaults | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.defaults = defaults or GenerationDefaults()
        self.chat_template = chat_template
        self.decoder = TokenDecoder(tokenizer)
        self.token_texts = TokenTexts(tokenizer, self.decoder)

    # ---- defaults ---------------------------------------------------------------------------------
    def default_sampling_fields(self) -> dict[str, Any]:
        """SamplingParams fields from generation_config.json (the request's unset fields take these)."""
        return dict(self.defaults.sampling)

    def default_params(self, **fields: Any) -> SamplingParams:
        values = self.default_sampling_fields()
        if self.defaults.max_new_tokens is not None:
            values["max_tokens"] = self.defaults.max_new_tokens
        values.update({k: v for k, v in fields.items() if v is not None})
        return SamplingParams(**values)

    # ---- prompts ----------------------------------------------------------------------------------
    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """The conversation through the chat template (`chat_template`: this call's own, else the model's)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ChatTemplateError(
                f"model {self.model.name!r} has no chat template, so chat requests cannot be formatted; "
                "start the server with --chat-template FILE (a Jinja template) or use /v1/completions"
            )
        if not messages:
            raise ValueError("messages must contain at least one message")
        norm = []
        # OpenAI's "developer" role is the system prompt, unless the template knows it as a role of its own
        developer_is_system = "developer" not in template
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"messages[{i}] must be an object with a 'role' and a 'content'")
            role = "system" if m["role"] == "developer" and developer_is_system else m["role"]
            norm.append({**m, "role": role, "content": flatten_content(m.get("content"))})
        try:
            text = self.tokenizer.apply_chat_template(
                norm,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                **(template_kwargs or {}),
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja raise_exception(), undefined variables, ...
            raise ValueError(f"the chat template could not format these messages: {e}") from e
        return str(text)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, list[int]]:
        text = self.render_chat(messages, **kwargs)
        return text, self.encode_text(text, add_special_tokens=False)

    def bad_word_ids(self, word: str) -> list[list[int]]:
        """The token sequences a bad word bans, as vLLM bans them: the word as it opens a text, and the word after
        a space (a different first token in the same number of tokens), so it is banned mid-text too."""
        bare = self.encode_text(word.lstrip(), add_special_tokens=False)
        spaced = self.encode_text(" " + word.lstrip(), add_special_tokens=False)
        if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare):
            return [bare, spaced]
        return [bare]

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_prompt(
        self, prompt: PromptType, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids), validated against the vocabulary."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        if isinstance(prompt, str):
            ids = self.encode_text(prompt, add_special_tokens)
            text: str | None = prompt
        elif isinstance(prompt, list):
            ids, text = list(prompt), None
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        self.check_token_ids(ids, "prompt")
        return text, ids

    def check_token_ids(self, ids: list[int], what: str) -> None:
        if not ids:
            raise ValueError(f"{what} must not be empty")
        vocab = self.model.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{what} token id {t!r} is out of range: token ids must be in [0, {vocab})")

    def check_priority(self, priority: int) -> None:
        """A priority other than 0 means nothing to a first-come-first-served engine: an error, as in vLLM."""
        if priority and self.model.scheduling_policy != "priority":
            raise ValueError(
                f"priority {priority}: request priorities need the priority scheduling policy "
                "(--scheduling-policy priority); this engine schedules first come, first served"
            )

    def check_length(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Raises the context-length error, and fills max_tokens=None with the rest of the context."""
        limit, num_prompt = self.model.max_model_len, len(prompt_ids)
        num_completion = params.max_tokens if params.max_tokens is not None else 0
        if num_prompt + num_completion > limit or (params.max_tokens is None and num_prompt >= limit):
            raise context_length_error(limit, num_prompt, num_completion)
        if params.max_tokens is None:
            params.max_tokens = limit - num_prompt
        return params

    def fit_length(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """The engine's rule (vLLM's offline one): the prompt must leave room for the output; max_tokens that is
        None or runs past max_model_len is cut to the room left, so generation ends there with finish_reason
        "length". The HTTP routes apply OpenAI's stricter rule first (`check_length`)."""
        limit, num_prompt = self.model.max_model_len, len(prompt_ids)
        if num_prompt > limit or (num_prompt == limit and params.max_tokens != 0):
            raise ValueError(
                f"The prompt is {num_prompt} tokens long, which leaves no room for output within this model's "
                f"maximum context length of {limit} tokens."
            )
        room = limit - num_prompt
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = room
            params.min_tokens = min(params.min_tokens, room)
        return params

    # ---- requests ---------------------------------------------------------------------------------
    def make_requests(
        self,
        request_id: str,
        prompt_text: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> tuple[ParentRequest, list[RequestState], list[tuple[str, SamplingParams]]]:
        """The parent, one RequestState per child, and (engine id, params) per child for the engine."""
        if params.truncate_prompt_tokens is not None:
            prompt_ids = keep_last(prompt_ids, params.truncate_prompt_tokens, self.model.max_model_len)
            prompt_text = None
        params = self.fit_length(prompt_ids, params)
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = [ids for w in params.bad_words for ids in self.bad_word_ids(w)]
        check_vocabulary([], params, self.model.vocab_size)  # logit_bias, allowed_token_ids, bad words
        params.check_logprobs_limit(self.model.max_logprobs, self.model.vocab_size)
        arrival = arrival_time or time.time()
        parent = ParentRequest(request_id, prompt_text, prompt_ids, params.n, params.output_kind)
        states, engine_reqs = [], []
        for i in range(params.n):
            if params.n == 1:
                child_id, child_params = request_id, params
            else:
                child_id = f"{i}_{request_id}"
                child_params = params.clone(
                    n=1,
                    seed=None if params.seed is None else params.seed + i,
                    prompt_logprobs=params.prompt_logprobs if i == 0 else None,
                )
            states.append(
                RequestState.create(
                    child_id,
                    request_id,
                    i,
                    prompt_text,
                    prompt_ids,
                    child_params,
                    self.decoder,
                    self.token_texts,
                    arrival,
                )
            )
            engine_reqs.append((child_id, child_params))
        return parent, states, engine_reqs
