"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API over the chat template.

`system` (a string or text blocks) becomes a leading system message. `stop_reason`: end_turn (EOS or a stop
token), max_tokens (length), stop_sequence (with `stop_sequence` set to the string that matched).
Streaming sends named events, each with an `event:` line and a `data:` object of the same `type`:
message_start → content_block_start → content_block_delta* → content_block_stop → message_delta → message_stop.
A failure mid-stream is an `event: error`. There is no [DONE].
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from treadle_frontend.server.common import ServerState, collect_all, new_id, sse_event, until_disconnect
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams


def _block_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise APIError(
                400, f"{where}[{i}]: content blocks of type {block.type!r} are not supported; send text"
            )
        parts.append(block.text)
    return "".join(parts)


def to_chat_messages(body: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> list[dict[str, Any]]:
    if not body.messages:
        raise APIError(400, "messages: at least one message is required")
    msgs: list[dict[str, Any]] = []
    if body.system:
        msgs.append({"role": "system", "content": _block_text(body.system, "system")})
    for i, m in enumerate(body.messages):
        msgs.append({"role": m.role, "content": _block_text(m.content, f"messages.{i}.content")})
    return msgs


def stop_info(finish: str | None, stop_reason: Any) -> tuple[str, str | None]:
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


class MessagesHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _encode(self, body: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> tuple[str, list[int]]:
        msgs = to_chat_messages(body)
        last_is_assistant = msgs[-1]["role"] == "assistant"
        return self.state.llm.input_processor.encode_chat(
            msgs, add_generation_prompt=not last_is_assistant, continue_final_message=last_is_assistant
        )

    async def count_tokens(self, body: AnthropicCountTokensRequest) -> dict[str, int]:
        self.state.check_model(body.model)
        _, ids = self._encode(body)
        return {"input_tokens": len(ids)}

    async def handle(self, body: AnthropicMessagesRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if body.max_tokens < 1:
            raise APIError(400, f"max_tokens: must be >= 1, got {body.max_tokens}")
        text, ids = self._encode(body)
        values = st.llm.input_processor.default_sampling_fields()
        for name in ("temperature", "top_p", "top_k"):
            v = getattr(body, name)
            if v is not None:
                values[name] = v
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        params = SamplingParams(
            max_tokens=body.max_tokens, stop=list(body.stop_sequences or []), output_kind=kind, **values
        )
        st.llm.input_processor.check_length(ids, params.clone())
        mid = new_id("msg_")
        gen = st.llm.generate(text, params, mid, prompt_token_ids=ids)
        if body.stream:
            return StreamingResponse(self._stream(mid, len(ids), gen), media_type="text/event-stream")
        out = (await until_disconnect(request, collect_all([gen])))[0]
        c = out.outputs[0]
        reason, seq = stop_info(c.finish_reason, c.stop_reason)
        return JSONResponse(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": st.model_name,
                "content": [{"type": "text", "text": c.text}],
                "stop_reason": reason,
                "stop_sequence": seq,
                "usage": {
                    "input_tokens": len(ids),
                    "output_tokens": len(c.token_ids),
                    "cache_read_input_tokens": out.num_cached_tokens or 0,
                },
            }
        )

    async def _stream(self, mid: str, num_input: int, gen: AsyncIterator[Any]) -> AsyncIterator[str]:
        model = self.state.model_name
        start = {
            "type": "message_start",
            "message": {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": num_input, "output_tokens": 0},
            },
        }
        yield sse_event("message_start", start)
        yield sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        num_output = 0
        reason, seq = "end_turn", None
        try:
            async for out in gen:
                c = out.outputs[0]
                num_output += len(c.token_ids)
                if c.text:
                    yield sse_event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": c.text},
                        },
                    )
                if c.finish_reason is not None:
                    reason, seq = stop_info(c.finish_reason, c.stop_reason)
        except Exception as e:
            yield sse_event("error", {"type": "error", "error": {"type": "api_error", "message": str(e)}})
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": seq},
                "usage": {"output_tokens": num_output},
            },
        )
        yield sse_event("message_stop", {"type": "message_stop"})
