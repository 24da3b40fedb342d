"""ServerConfig: how the API server listens and presents the model (the engine has its own configs, among them
max_logprobs, the most logprobs a request may ask for: ModelConfig)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from treadle_frontend.server.harmony import HARMONY, TOOL_PARSER
from treadle_frontend.server.lora import LoRAModule
from treadle_frontend.server.reply import REASONING_PARSERS, request_reasoning_parser
from treadle_frontend.server.tool_calls import PARSERS

logger = logging.getLogger(__name__)

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"  # interface to bind (--host)
    port: int = 8000  # TCP port (--port)
    api_key: str | None = None  # required on every /v1 route when set (--api-key)
    served_model_name: str | None = None  # the model id clients send; None = the model directory's name
    more_model_names: tuple[str, ...] = ()  # further served ids: listed by /v1/models and accepted
    model_aliases: tuple[str, ...] = ()  # ids also accepted (the model argument as given, as vLLM serves it)
    chat_template: str | None = None  # a Jinja file or template text overriding the tokenizer's
    generation_config: str = "auto"  # auto: the model's generation_config.json | none | a directory
    uvicorn_log_level: str = "info"  # uvicorn's own log level
    disable_log_stats: bool = False  # no periodic stats line
    stats_log_interval_s: float = 10.0  # seconds between stats lines while busy
    enable_auto_tool_choice: bool = False  # parse the tool calls replies write (needs tool_call_parser)
    tool_call_parser: str | None = None  # the format they are written in: "hermes" (tool_calls.PARSERS)
    # split the reasoning off into reasoning_content: qwen3 | deepseek_r1 (a <think> block) | openai_gptoss
    # (gpt-oss's harmony format; chosen by itself for a gpt_oss model: `for_model`)
    reasoning_parser: str | None = None
    # logprob tokens named "token_id:{id}" unless a request's return_tokens_as_token_ids says otherwise (vLLM's flag)
    return_tokens_as_token_ids: bool = False
    # CORS, as vLLM's --allowed-origins / --allowed-methods / --allowed-headers / --allow-credentials (its defaults)
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    lora_modules: tuple[
        LoRAModule, ...
    ] = ()  # LoRA adapters served as models (--lora-modules; needs enable_lora)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(
                f"uvicorn_log_level {self.uvicorn_log_level!r} is not one of {', '.join(UVICORN_LOG_LEVELS)}"
            )
        if self.stats_log_interval_s <= 0:
            raise ValueError(f"stats_log_interval_s must be > 0 seconds, got {self.stats_log_interval_s}")
        names = (self.served_model_name, *self.more_model_names)
        if self.more_model_names and self.served_model_name is None:
            raise ValueError("more_model_names needs served_model_name (the first served name)")
        if any(not n for n in names if n is not None):
            raise ValueError("a served model name must not be empty")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                f"--enable-auto-tool-choice needs --tool-call-parser (one of: {', '.join(PARSERS)})"
            )
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(
                f"tool_call_parser {self.tool_call_parser!r} is not one of: {', '.join(PARSERS)}"
            )
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"reasoning_parser {self.reasoning_parser!r} is not one of: {', '.join(REASONING_PARSERS)}"
            )
        harmony = (self.reasoning_parser == HARMONY, self.tool_call_parser == TOOL_PARSER)
        if harmony[0] and self.tool_call_parser not in (None, TOOL_PARSER):
            raise ValueError(
                f"--reasoning-parser {HARMONY} reads gpt-oss's harmony format, whose tool calls only "
                f"--tool-call-parser {TOOL_PARSER} reads, not {self.tool_call_parser!r}"
            )
        if harmony[1] and self.reasoning_parser not in (None, HARMONY):
            raise ValueError(
                f"--tool-call-parser {TOOL_PARSER} reads gpt-oss's harmony format, whose reasoning only "
                f"--reasoning-parser {HARMONY} reads, not {self.reasoning_parser!r}"
            )
        clash = {m.name for m in self.lora_modules} & {*names, *self.model_aliases}
        if clash:
            raise ValueError(
                f"LoRA adapter name(s) {sorted(clash)} are also served model names; rename the adapters"
            )
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty; omit --api-key to serve without authentication")

    def for_model(self, model_type: str | None) -> ServerConfig:
        """This config for a model of `model_type` (its config.json's): a gpt_oss model, which always writes the
        harmony format, gets the harmony reasoning parser when none was named (vLLM reads its replies so too).
        Its calls, as vLLM's, need --enable-auto-tool-choice --tool-call-parser openai."""
        if model_type != "gpt_oss" or self.reasoning_parser is not None:
            return self
        if self.tool_call_parser not in (None, TOOL_PARSER):
            raise ValueError(
                f"a gpt-oss model writes its tool calls in the harmony format: start the server with "
                f"--tool-call-parser {TOOL_PARSER}, not {self.tool_call_parser!r}"
            )
        logger.info("gpt-oss model: replies are read in the harmony format (--reasoning-parser %s)", HARMONY)
        return dataclasses.replace(self, reasoning_parser=HARMONY)

    def reply_reasoning_parser(self, template_kwargs: dict[str, Any] | None = None) -> str | None:
        """The reasoning parser that reads a reply rendered with these chat template kwargs (reply.py's
        request_reasoning_parser: deepseek_v3 follows the request's `thinking`)."""
        return request_reasoning_parser(self.reasoning_parser, template_kwargs)

    def reply_tool_parser(self, auto: bool) -> str | None:
        """The parser that reads the calls a reply writes, when the request lets the model choose (`auto`: it
        has tools and neither forbids nor forces a call) and the server was started to read them."""
        return self.tool_call_parser if auto and self.enable_auto_tool_choice else None

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"
