"""The FastAPI application: routes, API-key check, health, metrics and the periodic stats log line.

`build_app(llm, config)` wires an AsyncLLM (whatever engine client it holds) to the routes; the CLI runs it
with uvicorn. Every /v1 route requires the API key when one is configured (`Authorization: Bearer KEY` or
`x-api-key: KEY`); /health, /version, /metrics, /load, /tokenize and /detokenize stay open, as in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute

from treadle_frontend import envs
from treadle_frontend.async_llm import AsyncLLM
from treadle_frontend.server.chat import ChatHandler
from treadle_frontend.server.common import ServerState
from treadle_frontend.server.completions import CompletionsHandler
from treadle_frontend.server.config import ServerConfig
from treadle_frontend.server.embeddings import EmbeddingsHandler
from treadle_frontend.server.errors import APIError, error_response, install_error_handlers
from treadle_frontend.server.harmony_messages import for_template
from treadle_frontend.server.messages import MessagesHandler
from treadle_frontend.server.metrics import ServerMetrics
from treadle_frontend.server.protocol import (
    AnthropicCountTokensRequest,
    AnthropicMessagesRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from treadle_frontend.server.responses import ResponsesHandler
from treadle_frontend.server.scoring import ScoringHandler
from treadle_frontend.server.tool_calls import template_messages

logger = logging.getLogger(__name__)


def treadle_version() -> str:
    for dist in ("treadle", "treadle-frontend"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "0.0.0"


async def _stats_loop(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.stats_log_interval_s)
        if state.llm.num_unfinished == 0:
            await _refresh_gauges(state)  # idle: the engine sends no more outputs, so ask it once
        for line in state.metrics.log_lines():
            logger.info("%s", line)


def build_app(
    llm: AsyncLLM,
    config: ServerConfig,
    model_name: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """`on_ready`: called once start-up is done (the --lora-modules adapters loaded), just before the server
    accepts connections: the CLI logs that it is ready there."""
    name = model_name or config.served_model_name or llm.model.name
    config = config.for_model(llm.model.model_type)  # gpt-oss: the harmony reply parser
    metrics = ServerMetrics(name, llm.model.max_model_len, llm.model.num_speculative_tokens)
    llm.stats_listeners.append(metrics.record)
    state = ServerState(llm=llm, config=config, model_name=name, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for module in config.lora_modules:  # a bad adapter fails the start-up (server/lora.py)
            # vLLM's parent: the base_model_name given, when it is a name this server serves
            parent = module.base_model_name if module.base_model_name in state.model_names else name
            try:
                await state.loras.load(llm, module.name, module.path, parent)
            except ValueError as e:  # kept for the CLI, which exits with it once uvicorn gives up
                state.startup_error = ValueError(f"--lora-modules {module.name}={module.path}: {e}")
                raise state.startup_error from None
        if on_ready is not None:
            on_ready()
        task = None if config.disable_log_stats else asyncio.create_task(_stats_loop(state))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            # background responses still running are cancelled (server/responses_background.py)
            await responses.background.close()

    app = FastAPI(title="treadle", version=treadle_version(), lifespan=lifespan)
    app.state.treadle = state
    protected: set[str] = set()  # the key-checked routes outside /v1 (/score, /rerank, ...), filled below

    @app.middleware("http")
    async def check_api_key(request: Request, call_next: Any) -> Any:
        """The key before anything else (a malformed body without a key is a 401, as vLLM answers); either
        header may carry it (the anthropic SDK can send both)."""
        path = request.url.path.removeprefix(request.scope.get("root_path") or "")
        if config.api_key is None or request.method == "OPTIONS":
            return await call_next(request)
        if not path.startswith("/v1/") and path not in protected:
            return await call_next(request)
        auth = request.headers.get("authorization", "")
        tokens = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
        tokens.append(request.headers.get("x-api-key", ""))
        if not any(t and hmac.compare_digest(t.encode(), config.api_key.encode()) for t in tokens):
            message = "Invalid or missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            return error_response(request, 401, message, code="invalid_api_key")
        return await call_next(request)

    app.add_middleware(  # added last, so outermost: a 401 carries the CORS headers too
        CORSMiddleware,
        allow_origins=list(config.allowed_origins),
        allow_methods=list(config.allowed_methods),
        allow_headers=list(config.allowed_headers),
        allow_credentials=config.allow_credentials,
    )
    install_error_handlers(app)

    def check_alive() -> None:
        if llm.is_dead:
            raise APIError(
                503, f"the engine process is dead ({llm.dead_error}); restart the server", code="engine_dead"
            )

    v1 = APIRouter()
    completions, chat, messages = CompletionsHandler(state), ChatHandler(state), MessagesHandler(state)
    responses, embeddings = ResponsesHandler(state), EmbeddingsHandler(state)

    @v1.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Any:
        check_alive()
        return await completions.handle(body, request)

    @v1.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
        check_alive()
        return await chat.handle(body, request)

    @v1.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        check_alive()
        return await responses.handle(body, request)

    @v1.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, stream: bool = False, starting_after: int | None = None) -> Any:
        return responses.background.retrieve(response_id, stream, starting_after)

    @v1.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Any:
        return await responses.background.delete(response_id)

    @v1.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> Any:
        return await responses.background.cancel(response_id)

    @v1.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(
        response_id: str,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
        before: str | None = None,
    ) -> Any:
        return responses.store.input_items(response_id, limit, order, after, before)

    @v1.post("/v1/messages")
    async def create_message(body: AnthropicMessagesRequest, request: Request) -> Any:
        check_alive()
        return await messages.handle(body, request)

    @v1.post("/v1/embeddings")
    async def create_embedding(body: EmbeddingRequest, request: Request) -> Any:
        check_alive()
        return await embeddings.handle(body, request)

    scoring = ScoringHandler(state)

    @v1.post("/score")
    @v1.post("/v1/score")
    async def create_score(body: ScoreRequest, request: Request) -> Any:
        check_alive()
        return await scoring.score(body, request)

    @v1.post("/rerank")
    @v1.post("/v1/rerank")
    @v1.post("/v2/rerank")
    async def create_rerank(body: RerankRequest, request: Request) -> Any:
        check_alive()
        return await scoring.rerank(body, request)

    @v1.post("/v1/messages/count_tokens")
    async def count_tokens(body: AnthropicCountTokensRequest) -> Any:
        return await messages.count_tokens(body)

    def model_card(served: str) -> dict[str, Any]:
        return {
            "id": served,
            "object": "model",
            "created": state.created,
            "owned_by": "treadle",
            "root": str(llm.model.path) if llm.model.path else name,
            "parent": None,
            "max_model_len": llm.model.max_model_len,
        }

    def lora_cards() -> list[dict[str, Any]]:
        return state.loras.cards(state.created, llm.model.max_model_len)

    @v1.get("/v1/models")
    async def list_models() -> Any:
        return {
            "object": "list",
            "data": [*(model_card(served) for served in state.model_names), *lora_cards()],
        }

    @v1.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Any:
        """OpenAI's GET /v1/models/{model} (the SDK's models.retrieve): 404 model_not_found for a name not served."""
        state.check_model(model)
        return next((card for card in lora_cards() if card["id"] == model), None) or model_card(model)

    if envs.TREADLE_ALLOW_RUNTIME_LORA_UPDATING():
        logger.warning(
            "Runtime LoRA updating is on: /v1/load_lora_adapter loads any directory this server reads"
        )

        @v1.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Any:
            if body.lora_name in state.model_names or body.lora_name in config.model_aliases:
                raise APIError(400, f"The lora adapter name '{body.lora_name}' is a served model name; name the "
                               "adapter otherwise", param="lora_name")  # fmt: skip
            try:
                await state.loras.load(llm, body.lora_name, body.lora_path, name, body.load_inplace)
            except ValueError as e:
                raise APIError(400, str(e), param="lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @v1.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Any:
            try:
                await state.loras.unload(llm, body.lora_name)
            except KeyError:
                raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                               param="lora_name") from None  # fmt: skip
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    protected.update(r.path for r in v1.routes if isinstance(r, APIRoute) and not r.path.startswith("/v1/"))
    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if llm.is_dead else 200)

    @app.get("/version")
    async def get_version() -> Any:
        return {"version": treadle_version()}

    @app.get("/load")
    async def load() -> Any:
        return {"server_load": llm.num_unfinished}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        await _refresh_gauges(state)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:
        state.check_model(body.model)
        ip = llm.input_processor
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' or 'messages'")
        if body.messages is not None:  # as /v1/chat/completions renders them
            if body.continue_final_message and body.add_generation_prompt:
                raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                               param="continue_final_message")  # fmt: skip
            kwargs = {**(body.chat_template_kwargs or {}), **({"tools": body.tools} if body.tools else {})}
            _, ids = ip.encode_chat(
                for_template(
                    template_messages([m.model_dump(exclude_none=True) for m in body.messages]),
                    state.config.reasoning_parser,
                ),
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                template_kwargs=kwargs,
            )
        else:
            ids = ip.encode_text(body.prompt or "", add_special_tokens=body.add_special_tokens)
        strs = ip.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None  # vLLM's extra
        return {
            "count": len(ids),
            "max_model_len": llm.model.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:
        state.check_model(body.model)
        ip = llm.input_processor
        if body.tokens:
            ip.check_token_ids(body.tokens, "tokens")
        return {"prompt": ip.decoder.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/ping")
    async def ping() -> JSONResponse:
        return JSONResponse({}, status_code=503 if llm.is_dead else 200)

    return app


async def _refresh_gauges(state: ServerState) -> None:
    """Current running/waiting/KV gauges straight from the engine (outputs stop when it goes idle)."""
    llm = state.llm
    if llm.is_dead:
        return
    stats = None
    with contextlib.suppress(Exception):
        stats = await asyncio.wait_for(llm.call_utility("get_stats"), timeout=1.0)
    if stats is not None:
        state.metrics.set_gauges(stats)
    elif llm.num_unfinished == 0:
        state.metrics.set_gauges({"num_running_reqs": 0, "num_waiting_reqs": 0, "kv_cache_usage": 0.0})
