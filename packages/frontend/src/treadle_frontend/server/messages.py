"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API over the chat template.

`system` (a string or text blocks) becomes a leading system message. `stop_reason`: end_turn (EOS or a stop
token), max_tokens (length), stop_sequence (with `stop_sequence` set to the string that matched).
Streaming sends named events, each with an `event:` line and a `data:` object of the same `type`:
message_start → content_block_start → content_block_delta* → content_block_stop → message_delta → message_stop.
message_start goes out with the engine's first output (which knows the prefix-cache hits). A failure mid-stream
is an `event: error`. There is no [DONE].
usage follows Anthropic: input_tokens excludes the prompt tokens read from the prefix cache
(cache_read_input_tokens); the two add up to the prompt. Tool use (messages_tools.py) needs the server's
`--enable-auto-tool-choice --tool-call-parser hermes`; without them `tools` are a 400 unless `tool_choice`
forces a call (any / tool: constrained decoding, no flag needed), rather than ignored. With
`--reasoning-parser` the `<think>` block is a `thinking` block first (empty signature; `thinking.budget_tokens`
is not enforced beyond max_tokens), thinking blocks sent back in the history are dropped, as Anthropic drops
them from earlier turns; without a reasoning parser, enabled `thinking` is a 400. Under `deepseek_v3` enabled
`thinking` renders the template with `thinking=True` and reads the block; without it the reply is all text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from treadle_frontend.server.common import ServerState, new_id
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.forced_tools import ReplyReader
from treadle_frontend.server.harmony_messages import for_template
from treadle_frontend.server.messages_tools import (
    BlockStream,
    chat_turns,
    forced_choice,
    openai_tools,
    tool_use_block,
)
from treadle_frontend.server.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from treadle_frontend.server.reply import keeps_special_tokens, thinking_template_kwargs
from treadle_frontend.server.streams import (
    collect_all,
    event_stream,
    first_output,
    sse_event,
    until_disconnect,
)
from treadle_frontend.server.structured import forced_constraint
from treadle_frontend.server.tool_calls import Piece
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams


def _block_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text":
            raise APIError(
                400, f"{where}[{i}]: content blocks of type {block.type!r} are not supported; send text"
            )
        if block.text is None:
            raise APIError(400, f"{where}[{i}].text: a text block needs its text")
        parts.append(block.text)
    return "\n".join(parts)  # as vLLM joins text parts


def to_chat_messages(body: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> list[dict[str, Any]]:
    """The chat-template messages: `system` first; consecutive turns of one role combined into one turn (as
    Anthropic combines them), their texts one per line. Empty content is rejected, except in a final assistant
    turn (a prefill that is empty)."""
    if not body.messages:
        raise APIError(400, "messages: at least one message is required")
    msgs: list[dict[str, Any]] = []
    if body.system:
        msgs.append({"role": "system", "content": _block_text(body.system, "system")})
    last = len(body.messages) - 1
    for i, m in enumerate(body.messages):
        if m.role == "assistant" and not isinstance(m.content, str):  # earlier turns' thinking: dropped
            m = m.model_copy(update={"content": [b for b in m.content if b.type not in THINKING_BLOCKS]})
        if not isinstance(m.content, str) and any(b.type in ("tool_use", "tool_result") for b in m.content):
            blocks = [b.model_dump(exclude_none=True) for b in m.content]
            msgs += chat_turns(m.role, blocks, f"messages.{i}.content")
            continue
        text = _block_text(m.content, f"messages.{i}.content")
        if not text and not (i == last and m.role == "assistant"):
            raise APIError(400, f"messages.{i}.content: a {m.role} message needs non-empty content")
        if msgs and msgs[-1]["role"] == m.role and not msgs[-1].get("tool_calls"):
            msgs[-1]["content"] += "\n" + text
        else:
            msgs.append({"role": m.role, "content": text})
    return msgs


THINKING_BLOCKS = ("thinking", "redacted_thinking")


def thinking_enabled(body: AnthropicMessagesRequest | AnthropicCountTokensRequest) -> bool:
    return (body.thinking or {}).get("type") == "enabled"


def check_unsupported(body: AnthropicMessagesRequest, tools_on: bool, reasoning_on: bool) -> None:
    """Reject what the server cannot honour instead of silently replying with plain text."""
    kind = (body.tool_choice or {}).get("type")
    if kind not in (None, "auto", "none", "any", "tool"):
        raise APIError(400, f"tool_choice: {kind!r} is not one of auto, none, any, tool")
    if body.tools and not tools_on and kind not in ("any", "tool", "none"):
        raise APIError(400, "tools: tool use needs the server started with --enable-auto-tool-choice "
                            "--tool-call-parser hermes (or a tool_choice that forces a call)")  # fmt: skip
    if thinking_enabled(body) and not reasoning_on:
        raise APIError(400, "thinking: extended thinking needs the server started with --reasoning-parser")
    if body.temperature is not None and not 0.0 <= body.temperature <= 1.0:
        raise APIError(400, f"temperature: must be in [0, 1] (Anthropic's range), got {body.temperature}")


def usage(num_prompt: int, num_cached: int, num_output: int | None = None) -> dict[str, int]:
    """Anthropic's usage: input_tokens excludes the prompt tokens read from the prefix cache
    (cache_read_input_tokens), so the two add up to the prompt."""
    counts = {"input_tokens": num_prompt - num_cached, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": num_cached}  # fmt: skip
    return counts if num_output is None else {**counts, "output_tokens": num_output}


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
        last_is_assistant = msgs[-1]["role"] == "assistant" and not msgs[-1].get("tool_calls")
        kwargs = thinking_template_kwargs(self.state.config.reasoning_parser, thinking_enabled(body))
        if body.tools:
            kwargs["tools"] = openai_tools(body.tools)
        return self.state.llm.input_processor.encode_chat(
            for_template(msgs, self.state.config.reasoning_parser),
            add_generation_prompt=not last_is_assistant,
            continue_final_message=last_is_assistant,
            template_kwargs=kwargs,
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
        thinking = thinking_template_kwargs(st.config.reasoning_parser, thinking_enabled(body))
        rp = st.config.reply_reasoning_parser(thinking)
        check_unsupported(body, st.config.enable_auto_tool_choice, st.config.reasoning_parser is not None)
        forced = forced_choice(body.tools, body.tool_choice)
        choice = (body.tool_choice or {}).get("type")
        tools = st.config.reply_tool_parser(bool(body.tools) and forced is None and choice != "none")
        text, ids = self._encode(body)
        values = st.llm.input_processor.default_sampling_fields()
        for name in ("temperature", "top_p", "top_k"):
            v = getattr(body, name)
            if v is not None:
                values[name] = v
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        if forced is not None:  # decoding constrained to the calls' JSON
            values["structured_outputs"] = forced_constraint(forced, st.llm.input_processor.tokenizer, rp)
        if keeps_special_tokens(rp, tools):  # special tokens mark the reply's parts
            values["skip_special_tokens"] = False
        params = SamplingParams(
            max_tokens=body.max_tokens, stop=list(body.stop_sequences or []), output_kind=kind, **values
        )
        st.llm.input_processor.check_length(ids, params.clone())
        mid = new_id("msg_")
        gen = st.llm.generate(
            text, params, mid, prompt_token_ids=ids, lora_request=st.lora_request(body.model)
        )
        if body.stream:  # the engine's refusal before the first output is an HTTP error, as unstreamed
            gen = await first_output(request, gen)
            stream = self._stream(
                mid, len(ids), gen, rp, tools, forced, body.tools, st.response_model(body.model)
            )
            return event_stream(request, mid, stream, gen)
        out = (await until_disconnect(request, collect_all([gen])))[0]
        c = out.outputs[0]
        reason, seq = stop_info(c.finish_reason, c.stop_reason)
        reasoning, content, calls = ReplyReader(rp, tools, forced, body.tools, calls_only=True).whole(c.text)
        blocks: list[dict[str, Any]] = (
            [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
        )
        # a forced reply is only tool_use blocks: one cut inside its first call's name has none at all
        empty = not (calls or reasoning or forced)
        blocks += [{"type": "text", "text": content or ""}] if content or empty else []
        blocks += [tool_use_block(call) for call in calls]
        return JSONResponse(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": st.response_model(body.model),
                "content": blocks,
                "stop_reason": "tool_use" if calls and reason != "max_tokens" else reason,
                "stop_sequence": seq,
                "usage": usage(len(ids), out.num_cached_tokens or 0, len(c.token_ids)),
            }
        )

    def _opening(
        self, mid: str, num_input: int, num_cached: int, blocks: BlockStream, on_demand: bool, model: str
    ) -> list[str]:
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(num_input, num_cached, 0),
        }
        opening = [] if on_demand else blocks.start_text()  # a reasoning parser or a forced call: on demand
        return [sse_event("message_start", {"type": "message_start", "message": message}), *opening]

    async def _stream(
        self,
        mid: str,
        num_input: int,
        gen: AsyncIterator[Any],
        rp: str | None,
        tools: str | None,
        forced: Any,
        definitions: list[Any] | None,
        model: str,
    ) -> AsyncIterator[str]:
        """message_start waits for the engine's first output, which knows the prompt's prefix-cache hits."""
        num_output, num_cached = 0, 0
        reason, seq = "end_turn", None
        blocks = BlockStream()
        parser = ReplyReader(rp, tools, forced, definitions, calls_only=True).stream()
        on_demand = rp is not None or forced is not None or tools is not None  # a reply may open with a call
        started = False
        try:
            async for out in gen:
                if not started:
                    num_cached, started = out.num_cached_tokens or 0, True
                    for event in self._opening(mid, num_input, num_cached, blocks, on_demand, model):
                        yield event
                c = out.outputs[0]
                num_output += len(c.token_ids)
                final = c.finish_reason is not None
                for piece in parser.feed(c.text, final=final) if parser else [Piece(content=c.text)]:
                    for event in [*blocks.thinking(piece.reasoning), *blocks.text(piece.content)]:
                        yield event
                    for delta in piece.deltas:
                        for event in blocks.call(delta):
                            yield event
                if c.finish_reason is not None:
                    reason, seq = stop_info(c.finish_reason, c.stop_reason)
        except Exception as e:
            yield sse_event("error", {"type": "error", "error": {"type": "api_error", "message": str(e)}})
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        if not started:  # the stream ended without an output (not expected from the engine)
            for event in self._opening(mid, num_input, 0, blocks, on_demand, model):
                yield event
        if blocks.index < 0 and forced is None:  # no block at all (an empty reply under a reasoning parser)
            for event in blocks.start_text():
                yield event
        for event in blocks.close():
            yield event
        yield sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": "tool_use" if blocks.num_calls and reason != "max_tokens" else reason,
                    "stop_sequence": seq,
                },
                "usage": usage(num_input, num_cached, num_output),
            },
        )
        yield sse_event("message_stop", {"type": "message_stop"})
