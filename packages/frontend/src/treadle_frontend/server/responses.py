"""POST /v1/responses: OpenAI's Responses API for text and function tools, over the chat template (vLLM serves
it too). Tools and function-call items: responses_tools.py.

`input` is a string (one user turn) or a list of turns (`{"role", "content"}` with a string or `input_text`
parts; `type: "message"` items are the same); `instructions` become a leading system turn (responses_input.py).
`max_output_tokens`, `temperature`, `top_p` and `text.format` (`json_schema` / `json_object`: structured outputs)
apply. The reply's
text is one `message` output item holding one `output_text` part, its calls `function_call` items after it. A
reply cut at max_output_tokens has status "incomplete" with `incomplete_details.reason` "max_output_tokens".
Streaming sends named events, each with a `sequence_number`: response.created → response.in_progress →
response.output_item.added → response.content_part.added → response.output_text.delta* → response.output_text.done →
response.content_part.done → response.output_item.done → response.completed (or response.incomplete); a failure
mid-stream is an `error` event. Responses are kept unless `store` is false (responses_store.py): a request naming
`previous_response_id` continues one's conversation, GET / DELETE /v1/responses/{id} read and drop one, GET
/v1/responses/{id}/input_items lists what it answered; `background: true` makes the reply in a server task, read back
by GET, cancelled by POST /v1/responses/{id}/cancel (responses_background.py). With a reasoning parser the block is
a `reasoning` output item before the message (streamed as response.reasoning_text.delta events), its tokens
counted in `usage.output_tokens_details.reasoning_tokens`.
`reasoning.effort` (low, medium, high) reaches the chat template as its `reasoning_effort` variable (gpt-oss's).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from treadle_frontend import envs
from treadle_frontend.outputs import RequestOutput
from treadle_frontend.server.common import ServerState, new_id, reasoning_effort, sampling_params
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.forced_tools import ReplyReader, forced_schema
from treadle_frontend.server.harmony_messages import for_template
from treadle_frontend.server.protocol import ResponsesRequest
from treadle_frontend.server.reply import keeps_special_tokens
from treadle_frontend.server.responses_background import BackgroundRun, BackgroundRuns, check_background
from treadle_frontend.server.responses_input import input_items, to_chat_messages
from treadle_frontend.server.responses_store import ResponseStore
from treadle_frontend.server.responses_tools import (
    ItemStream,
    call_item,
    chat_tools,
    forced_choice,
    message,
    reasoning_item,
    reasoning_tokens,
)
from treadle_frontend.server.streams import (
    collect_all,
    event_stream,
    first_output,
    sse_event,
    until_disconnect,
)
from treadle_frontend.server.structured import compile_constraint, forced_constraint, format_fields
from treadle_frontend.server.tool_calls import Piece
from treadle_model_runner.sampling_params import RequestOutputKind


class ResponsesHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.store = ResponseStore(envs.TREADLE_RESPONSES_STORE_SIZE())
        self.background = BackgroundRuns(self.store, state.llm.abort)

    async def handle(self, body: ResponsesRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if body.background:
            check_background(body, self.store)
        if body.previous_response_id:
            items = [*self.store.conversation(body.previous_response_id), *input_items(body)]
            body = body.model_copy(update={"input": items})
        tools = chat_tools(body.tools)
        choice = forced_choice(body.tool_choice)
        forced = forced_schema(tools, choice) if choice is not None else None
        tool_parser = st.config.reply_tool_parser(
            bool(tools) and forced is None and body.tool_choice != "none"
        )
        if body.max_output_tokens is not None and body.max_output_tokens < 1:
            raise APIError(400, f"max_output_tokens must be >= 1, got {body.max_output_tokens}",
                           param="max_output_tokens")  # fmt: skip
        ip, rp = st.llm.input_processor, st.config.reply_reasoning_parser()
        effort = (body.reasoning or {}).get("effort") if isinstance(body.reasoning, dict) else None
        kwargs = {**({"tools": tools} if tools else {}), **reasoning_effort(effort, "reasoning.effort")}
        text, ids = ip.encode_chat(
            for_template(to_chat_messages(body), rp),
            add_generation_prompt=True,
            template_kwargs=kwargs,
        )
        ip.check_token_ids(ids, "the rendered input")
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        params = sampling_params(st, body, max_tokens=body.max_output_tokens, logprobs=None, kind=kind)
        # special tokens mark the reply's parts (harmony's channels, Mistral's calls)
        if keeps_special_tokens(rp, tool_parser):
            params = params.clone(skip_special_tokens=False)
        fmt = (body.text or {}).get("format") or {}
        if fmt.get("type") not in (None, "text"):  # the Responses API's structured outputs: text.format
            fields = format_fields(fmt.get("type"), fmt.get("schema"), "text.format", "text.format.schema")
            so = compile_constraint("text.format", fields, ip.tokenizer, rp)
            params = params.clone(structured_outputs=so)
        if forced is not None:  # decoding constrained to the calls' JSON
            if params.structured_outputs is not None:
                raise APIError(400, "tool_choice: a forced call cannot be combined with text.format",
                               param="tool_choice")  # fmt: skip
            so = forced_constraint(forced, ip.tokenizer, rp)
            params = params.clone(structured_outputs=so)
        ip.check_length(ids, params.clone())
        rid = new_id("resp_")
        gen = st.llm.generate(
            text, params, rid, prompt_token_ids=ids, lora_request=st.lora_request(body.model)
        )
        created = int(time.time())
        # calls_only: a forced reply is function_call items also when max_output_tokens cuts it (forced_tools.py)
        reply = ReplyReader(rp, tool_parser, forced, tools, calls_only=True)
        if body.background:
            return self._in_background(rid, created, body, len(ids), gen, reply)
        if body.stream:  # the engine's refusal before the first output is an HTTP error, as unstreamed
            gen = await first_output(request, gen)
            stream = self._stream(rid, created, body, len(ids), gen, reply)  # stored as it ends
            return event_stream(request, rid, stream, gen)
        out = (await until_disconnect(request, collect_all([gen])))[0]
        return JSONResponse(self._kept(body, self._unstreamed(rid, created, body, len(ids), out, reply)))

    def _unstreamed(self, rid: str, created: int, body: ResponsesRequest, num_input: int, out: RequestOutput,
                    reply: ReplyReader) -> dict[str, Any]:  # fmt: skip
        """The response object of a reply read whole (its final output)."""
        ip = self.state.llm.input_processor
        c = out.outputs[0]
        status = "incomplete" if c.finish_reason == "length" else "completed"
        reasoning, content, calls = reply.whole(c.text)
        output = [] if reasoning is None else [reasoning_item(new_id("rs_"), reasoning, "completed"
                                                             if content or calls else status)]  # fmt: skip
        if content or not (calls or reasoning is not None):
            output.append(message(new_id("msg_"), content or "", status))
        output += [call_item(call, new_id("fc_")) for call in calls]
        thought = reasoning_tokens(
            ip.tokenizer, list(c.token_ids), reasoning is not None, self.state.config.reply_reasoning_parser()
        )
        counts = (num_input, out.num_cached_tokens or 0, len(c.token_ids), thought)
        return self._response(rid, created, body, output, status, counts)

    def _in_background(self, rid: str, created: int, body: ResponsesRequest, num_input: int,
                       gen: AsyncIterator[RequestOutput], reply: ReplyReader) -> Any:  # fmt: skip
        """Starts the reply's server task (responses_background.py): the queued response, or with stream its
        events from the first."""
        queued = self._response(rid, created, body, [], "queued", None)
        self.store.put(queued, input_items(body))

        async def work(run: BackgroundRun) -> None:
            self.store.update(self._response(rid, created, body, [], "in_progress", None))
            if run.streamed:
                async for event in self._stream(rid, created, body, num_input, gen, reply):
                    run.add(event)
            else:
                out = (await collect_all([gen]))[0]
                self._kept(body, self._unstreamed(rid, created, body, num_input, out, reply))

        def end(status: str, error: str | None) -> dict[str, Any]:
            return self._kept(body, self._response(rid, created, body, [], status, None, error))

        run = BackgroundRun(rid, bool(body.stream), end)
        self.background.start(run, work)
        return self.background.stream(run, -1) if body.stream else JSONResponse(queued)

    def _kept(self, body: ResponsesRequest, response: dict[str, Any]) -> dict[str, Any]:
        """`response`, stored with the input it answered unless the request said `store: false` (a background
        response is stored from its start: this is its new state)."""
        if body.background:
            self.store.update(response)
        elif body.store is not False:
            self.store.put(response, input_items(body))
        return response

    def _response(self, rid: str, created: int, body: ResponsesRequest, output: list[dict[str, Any]], status: str,
                  counts: tuple[int, int, int, int] | None, error: str | None = None) -> dict[str, Any]:  # fmt: skip
        usage = None
        if counts is not None:  # input, cached input, output, reasoning tokens
            n_in, n_cached, n_out, n_thought = counts
            usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": n_cached, "cache_write_tokens": 0},
                     "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": n_thought},
                     "total_tokens": n_in + n_out}  # fmt: skip
        fmt = (body.text or {}).get("format") or {"type": "text"}
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        return {
            "id": rid, "object": "response", "created_at": created, "model": self.state.response_model(body.model),
            "status": status, "output": output, "background": bool(body.background),
            "error": None if error is None else {"code": "server_error", "message": error},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": True, "tool_choice": choice,
            "tools": body.tools or [], "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": fmt}, "usage": usage,
        }  # fmt: skip

    async def _stream(self, rid: str, created: int, body: ResponsesRequest, num_input: int,
                      gen: AsyncIterator[Any], reply: ReplyReader) -> AsyncIterator[str]:  # fmt: skip
        seq = iter(range(1 << 62))

        def event(kind: str, **data: Any) -> str:
            return sse_event(kind, {"type": kind, "sequence_number": next(seq), **data})

        started = self._response(rid, created, body, [], "in_progress", None)
        # a background response is created queued (responses_background.py)
        queued = {**started, "status": "queued"}
        yield event("response.created", response=queued if body.background else started)
        yield event("response.in_progress", response=started)
        items = ItemStream(event)
        parser = reply.stream()
        finish, output_ids, num_cached, reasoned = None, [], 0, False
        try:
            async for out in gen:
                num_cached = max(num_cached, out.num_cached_tokens or 0)
                c = out.outputs[0]
                output_ids += c.token_ids
                finish = c.finish_reason or finish
                final = c.finish_reason is not None
                for piece in parser.feed(c.text, final=final) if parser else [Piece(content=c.text)]:
                    reasoned = reasoned or bool(piece.reasoning)
                    for ev in [
                        *items.reasoning(piece.reasoning),
                        *items.text(piece.content),
                        *(e for delta in piece.deltas for e in items.call(delta)),
                    ]:
                        yield ev
        except Exception as e:
            # a background response fails (responses_background.py)
            if body.background:
                raise
            yield event("error", code="server_error", message=str(e), param=None)
            return
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        status = "incomplete" if finish == "length" else "completed"
        for ev in items.finish(status):
            yield ev
        tokenizer, rp = self.state.llm.input_processor.tokenizer, self.state.config.reply_reasoning_parser()
        thought = reasoning_tokens(tokenizer, output_ids, reasoned, rp)
        counts = (num_input, num_cached, len(output_ids), thought)
        done = self._kept(body, self._response(rid, created, body, items.items, status, counts))
        yield event(f"response.{status}", response=done)
