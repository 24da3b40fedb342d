"""POST /v1/responses: OpenAI's Responses API for text, over the chat template (vLLM serves it too).

`input` is a string (one user turn) or a list of turns (`{"role", "content"}` with a string or `input_text`
parts; `type: "message"` items are the same); `instructions` become a leading system turn. `max_output_tokens`,
`temperature`, `top_p` and `text.format` (`json_schema` / `json_object`: structured outputs) apply. The reply is
one `message` output item holding one `output_text` part. A reply cut at max_output_tokens has status
"incomplete" with `incomplete_details.reason` "max_output_tokens". Streaming sends named events, each with a
`sequence_number`: response.created → response.in_progress → response.output_item.added →
response.content_part.added → response.output_text.delta* → response.output_text.done →
response.content_part.done → response.output_item.done → response.completed (or response.incomplete); a failure
mid-stream is an `error` event. Nothing is stored: `previous_response_id`, `background` and `tools` are 400s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from treadle_frontend.server.common import (
    ServerState,
    collect_all,
    new_id,
    sampling_params,
    sse_event,
    until_disconnect,
)
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.protocol import ResponsesRequest
from treadle_frontend.server.structured import after_reasoning, structured_outputs
from treadle_model_runner.sampling_params import RequestOutputKind


def to_chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = (
        [{"role": "system", "content": body.instructions}] if body.instructions else []
    )
    if isinstance(body.input, str):
        return [*msgs, {"role": "user", "content": body.input}]
    if not body.input:
        raise APIError(400, "input: at least one input item is required", param="input")
    for i, item in enumerate(body.input):
        if item.get("type", "message") != "message" or not isinstance(item.get("role"), str):
            raise APIError(400, f"input[{i}]: only message items ({{role, content}}) are supported here",
                           param="input")  # fmt: skip
        msgs.append({"role": item["role"], "content": _text(item.get("content"), i)})
    return msgs


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content or []):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            raise APIError(400, f"input[{i}].content[{j}]: only text parts are supported", param="input")
        parts.append(str(part.get("text", "")))
    return "\n".join(parts)


class ResponsesHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle(self, body: ResponsesRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        for name in ("previous_response_id", "background", "tools"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported: this server keeps no responses and calls no tools "
                                    "on /v1/responses", param=name)  # fmt: skip
        if body.max_output_tokens is not None and body.max_output_tokens < 1:
            raise APIError(400, f"max_output_tokens must be >= 1, got {body.max_output_tokens}",
                           param="max_output_tokens")  # fmt: skip
        ip = st.llm.input_processor
        text, ids = ip.encode_chat(to_chat_messages(body), add_generation_prompt=True)
        ip.check_token_ids(ids, "the rendered input")
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        params = sampling_params(st, body, max_tokens=body.max_output_tokens, logprobs=None, kind=kind)
        fmt = (body.text or {}).get("format")
        if fmt:  # the Responses API's structured outputs: text.format {type, schema, name}
            wrapped = {"type": fmt.get("type"), "json_schema": {"schema": fmt.get("schema")}}
            try:
                so = structured_outputs(_Format(wrapped), ip.tokenizer is not None)
            except APIError as e:  # named as this API names the field
                message = e.message.replace("response_format.json_schema.schema", "text.format.schema")
                raise APIError(
                    400, message.replace("response_format", "text.format"), param="text.format"
                ) from None
            if so is not None:
                params = params.clone(structured_outputs=after_reasoning(so, st.config.reasoning_parser,
                                                                         ip.tokenizer))  # fmt: skip
        ip.check_length(ids, params.clone())
        rid = new_id("resp_")
        gen = st.llm.generate(text, params, rid, prompt_token_ids=ids)
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                self._stream(rid, created, body, len(ids), gen), media_type="text/event-stream"
            )
        out = (await until_disconnect(request, collect_all([gen])))[0]
        c = out.outputs[0]
        counts = (len(ids), out.num_cached_tokens or 0, len(c.token_ids))
        return JSONResponse(
            self._response(rid, created, body, new_id("msg_"), c.text, c.finish_reason, counts)
        )

    def _response(self, rid: str, created: int, body: ResponsesRequest, mid: str, text: str | None,
                  finish: str | None, counts: tuple[int, int, int] | None) -> dict[str, Any]:  # fmt: skip
        """The response object; `text` None: still in progress (no output item yet)."""
        incomplete = finish == "length"
        status = "in_progress" if finish is None else ("incomplete" if incomplete else "completed")
        output = [] if text is None else [_message(mid, text, "incomplete" if incomplete else "completed")]
        usage = None
        if counts is not None:
            n_in, n_cached, n_out = counts
            usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": n_cached, "cache_write_tokens": 0},
                     "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": n_in + n_out}  # fmt: skip
        fmt = (body.text or {}).get("format") or {"type": "text"}
        return {
            "id": rid, "object": "response", "created_at": created, "model": self.state.model_name,
            "status": status, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
            "temperature": body.temperature, "top_p": body.top_p, "text": {"format": fmt}, "usage": usage,
        }  # fmt: skip

    async def _stream(self, rid: str, created: int, body: ResponsesRequest, num_input: int,
                      gen: AsyncIterator[Any]) -> AsyncIterator[str]:  # fmt: skip
        seq = iter(range(1 << 62))
        mid = new_id("msg_")

        def event(kind: str, **data: Any) -> str:
            return sse_event(kind, {"type": kind, "sequence_number": next(seq), **data})

        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        yield event("response.created", response=self._response(rid, created, body, mid, None, None, None))
        yield event(
            "response.in_progress", response=self._response(rid, created, body, mid, None, None, None)
        )
        yield event("response.output_item.added", output_index=0, item=_message(mid, None, "in_progress"))
        yield event("response.content_part.added", part=_part(""), **where)
        text, finish, num_output, num_cached = "", None, 0, 0
        try:
            async for out in gen:
                num_cached = max(num_cached, out.num_cached_tokens or 0)
                c = out.outputs[0]
                num_output += len(c.token_ids)
                finish = c.finish_reason or finish
                if c.text:
                    text += c.text
                    yield event("response.output_text.delta", delta=c.text, logprobs=[], **where)
        except Exception as e:
            yield event("error", code="server_error", message=str(e), param=None)
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        finish = finish or "stop"
        status = "incomplete" if finish == "length" else "completed"
        yield event("response.output_text.done", text=text, logprobs=[], **where)
        yield event("response.content_part.done", part=_part(text), **where)
        yield event("response.output_item.done", output_index=0, item=_message(mid, text, status))
        done = self._response(rid, created, body, mid, text, finish, (num_input, num_cached, num_output))
        yield event(f"response.{status}", response=done)


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(mid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_part(text)]
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": content}


class _Format:
    """`text.format` seen as a chat request's response_format, for structured_outputs()."""

    def __init__(self, response_format: dict[str, Any]) -> None:
        self.response_format = response_format
