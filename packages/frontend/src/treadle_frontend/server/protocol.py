"""Request bodies of every route, as pydantic models (validation failures become HTTP 400 envelopes).

Fields follow OpenAI's published spec, plus vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output, skip_special_tokens, priority, and beam
search's use_beam_search and length_penalty), and the Anthropic Messages spec. Unknown fields are ignored, as vLLM does. Range checks live in SamplingParams, so the
server and the offline API reject the same things with the same messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

IntList = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Body):
    """Sampling fields shared by the two OpenAI routes; None = unset (the model's defaults apply)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema (server/structured.py)
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json | regex | choice | grammar | json_object
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and each choice's token_ids in the response
    # vLLM's: logprob tokens named "token_id:{id}" (None: the server's --return-tokens-as-token-ids)
    return_tokens_as_token_ids: bool | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (-1: max_model_len)
    use_beam_search: bool = False  # vLLM's: beam search with n beams, the n best returned (server/beam.py)
    length_penalty: float = 1.0  # vLLM's, beam search only: score = cum_logprob / len ** length_penalty


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | IntList | list[IntList]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None
    add_special_tokens: bool = True


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # low | medium | high: the chat template's reasoning_effort variable (gpt-oss's reads it)
    reasoning_effort: str | None = None
    echo: bool = False
    prompt_logprobs: int | None = None


class ResponsesRequest(_Body):
    """OpenAI's Responses API, the text subset (server/responses.py)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] | None = None  # function tools (responses_tools.py)
    tool_choice: Any = None
    # {"effort": low | medium | high}: the chat template's reasoning_effort variable
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None  # continues a stored response (server/responses_store.py)
    background: bool | None = None  # true: made in a server task (server/responses_background.py)
    store: bool | None = None  # false: not kept (default: kept, as OpenAI's)
    user: str | None = None


class AnthropicTextBlock(_Body):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicTextBlock]


class AnthropicMessagesRequest(_Body):
    model: str
    max_tokens: StrictInt = Field(...)
    messages: list[AnthropicMessage]
    system: str | list[AnthropicTextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # needs --enable-auto-tool-choice (messages_tools.py)
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # rejected when enabled


class AnthropicCountTokensRequest(_Body):
    model: str
    messages: list[AnthropicMessage]
    system: str | list[AnthropicTextBlock] | None = None
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template, as in a request
    thinking: dict[str, Any] | None = None  # rendered as a request renders it (deepseek_v3's `thinking`)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | IntList | list[IntList]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    add_special_tokens: bool = True  # vLLM's extra
    priority: int = 0  # vLLM's extra
    truncate_prompt_tokens: int | None = (
        None  # vLLM's extra: keep each input's last k tokens (-1: max_model_len)
    )
    normalize: bool | None = (
        None  # vLLM's extra: L2-normalise the vectors (None: the server's --pooler-config)
    )


class ScoreRequest(_Body):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    add_special_tokens: bool = True
    priority: int = 0
    truncate_prompt_tokens: int | None = None


class RerankRequest(_Body):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int = 0  # 0 = every document
    return_documents: bool = True
    add_special_tokens: bool = True
    priority: int = 0
    truncate_prompt_tokens: int | None = None


class LoadLoRAAdapterRequest(_Body):
    """vLLM's POST /v1/load_lora_adapter (with TREADLE_ALLOW_RUNTIME_LORA_UPDATING)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # an adapter of that name already loaded: replace its weights (else a 400)


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: str
    lora_int_id: int | None = None  # accepted, as vLLM accepts it; the name decides
