"""POST /v1/chat/completions: messages through the chat template, n choices, streamed or not.

Streaming follows OpenAI: per choice, a first chunk with `delta {"role": "assistant", "content": ""}`, then
content deltas, and `finish_reason` set only on the choice's last chunk; with `stream_options.include_usage`
every chunk carries `usage: null` and one extra chunk with `choices: []` and the usage precedes `[DONE]`.
`logprobs: true` (+ `top_logprobs` ≤ the engine's --max-logprobs, 20 by default; -1: the whole vocabulary) returns
`{content: [{token, logprob, bytes, top_logprobs}]}`.
With `--enable-auto-tool-choice --tool-call-parser hermes` and `tools` in the request (tool_choice auto), calls
the model writes come back as `message.tool_calls` with finish_reason "tool_calls" (tool_calls.py); streamed, a
call's first `delta.tool_calls` entry carries its index, id and name, and later ones add to its `arguments` as the
model writes them. A forced call (`tool_choice` "required" or a named function; forced_tools.py) is tool_calls
also when max_tokens cuts it: finish_reason "length", content null, the arguments written so far. With
`--reasoning-parser qwen3|deepseek_r1` the `<think>` block is `message.reasoning_content` (streamed as
`delta.reasoning_content`), vLLM's field (reply.py); gpt-oss's harmony format (`--reasoning-parser openai_gptoss`,
chosen by itself for a gpt_oss model; `--tool-call-parser openai`) likewise (harmony.py). `reasoning_effort` (low,
medium, high) reaches the chat template as its `reasoning_effort` variable (gpt-oss's template reads it).
`use_beam_search` (server/beam.py): the n best of n beams; streamed, each choice's whole text is one chunk.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from treadle_frontend.input_processor import flatten_content
from treadle_frontend.logprobs import chat_logprobs, prompt_logprobs_json
from treadle_frontend.outputs import RequestOutput
from treadle_frontend.server.beam import beam_searches, length_params
from treadle_frontend.server.common import (
    ServerState,
    check_priority,
    new_id,
    reasoning_effort,
    sampling_params,
    truncate_prompt,
    usage,
)
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.forced_tools import ReplyReader, chat_delta, forced_schema
from treadle_frontend.server.harmony_messages import for_template
from treadle_frontend.server.offload import is_heavy, json_reply, logprob_entries, off_loop, sse_text
from treadle_frontend.server.protocol import ChatCompletionRequest
from treadle_frontend.server.reply import keeps_special_tokens
from treadle_frontend.server.streams import collect_all, event_stream, first_output, sse, until_disconnect
from treadle_frontend.server.structured import forced_constraint
from treadle_frontend.server.tool_calls import template_messages
from treadle_model_runner.sampling_params import RequestOutputKind


def finish_str(reason: str | None) -> str | None:
    return None if reason is None else (reason if reason in ("stop", "length") else "stop")


class ChatHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.texts = state.llm.input_processor.token_texts

    async def handle(self, body: ChatCompletionRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if not body.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        if body.continue_final_message and body.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: send "
                                "add_generation_prompt false to continue the final message",
                           param="continue_final_message")  # fmt: skip
        # vLLM's rules for top_logprobs; its limit (the engine's max_logprobs) is checked in sampling_params
        if body.top_logprobs is not None:
            if body.top_logprobs < -1:
                raise APIError(400, f"top_logprobs must be non-negative or -1 (the whole vocabulary), got "
                                    f"{body.top_logprobs}", param="top_logprobs")  # fmt: skip
            if not body.logprobs and body.top_logprobs != 0:
                raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(body, field)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{field} must be >= 1, got {max_tokens}", param=field)
        choice = (
            body.tool_choice if isinstance(body.tool_choice, str) else (body.tool_choice or {}).get("type")
        )
        if choice not in (None, "auto", "none", "required", "function"):
            raise APIError(400, f"tool_choice {choice!r}: one of none, auto, required or a function",
                           param="tool_choice")  # fmt: skip
        forced = forced_schema(body.tools, body.tool_choice) if choice in ("required", "function") else None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        prompt_logprobs = None if body.stream and body.prompt_logprobs == 0 else body.prompt_logprobs
        if (
            body.stream and prompt_logprobs is not None
        ):  # vLLM refuses > 0 and -1; 0 asks for nothing streamed
            raise APIError(
                400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
            )
        beam = body.use_beam_search  # server/beam.py: most sampling fields are ignored, as vLLM ignores them
        params = length_params(body, max_tokens) if beam else sampling_params(
            st, body, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, kind=kind,
            logprobs_field="top_logprobs",
        )  # fmt: skip
        if forced is not None and not beam:  # decoding constrained to the call's JSON
            if params.structured_outputs is not None:
                raise APIError(400, "tool_choice: a forced tool call cannot be combined with a structured "
                                    "output", param="tool_choice")  # fmt: skip
            so = forced_constraint(
                forced,
                st.llm.input_processor.tokenizer,
                st.config.reply_reasoning_parser(body.chat_template_kwargs),
            )
            params = params.clone(structured_outputs=so)
        messages = template_messages([m.model_dump(exclude_none=True) for m in body.messages])
        tools = st.config.reply_tool_parser(bool(body.tools) and choice != "none")
        if keeps_special_tokens(st.config.reasoning_parser, tools):  # special tokens mark the reply's parts
            params = params.clone(skip_special_tokens=False)
        kwargs = {
            **(body.chat_template_kwargs or {}),
            **reasoning_effort(body.reasoning_effort, "reasoning_effort"),
        }
        if body.tools:
            kwargs["tools"] = body.tools
        ip = st.llm.input_processor
        text, ids = ip.encode_chat(
            for_template(messages, st.config.reasoning_parser),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs=kwargs,
        )
        ip.check_token_ids(ids, "the rendered chat prompt")
        ids = truncate_prompt(ids, body.truncate_prompt_tokens, ip.model.max_model_len)
        checked = ip.check_length(ids, params.clone())
        check_priority(st, body.priority)
        rid = new_id("chatcmpl-")
        lora = st.lora_request(body.model)
        gen = beam_searches(st, body, [(text, ids)], [checked], rid, lora, prompt_logprobs)[0] if beam else (
            st.llm.generate(text, params, rid, prompt_token_ids=ids, priority=body.priority, lora_request=lora)
        )  # fmt: skip
        created = int(time.time())
        if body.stream:  # the engine's refusal before the first output is an HTTP error, as unstreamed
            gen = await first_output(request, gen)
            stream = self._stream(rid, created, body, ids, gen, tools, forced, echoed(body, messages))
            return event_stream(request, rid, stream, gen)
        final = (await until_disconnect(request, collect_all([gen])))[0]
        heavy = is_heavy(self._entries(body, sum(len(c.token_ids) for c in final.outputs), len(ids)))
        return await off_loop(heavy, lambda: json_reply(heavy, self._response(
            rid, created, body, final, tools, forced, echoed(body, messages))))  # fmt: skip

    def _entries(self, body: ChatCompletionRequest, num_tokens: int, num_prompt: int = 0) -> int:
        """The logprob entries a reply (or chunk) of `num_tokens` tokens builds (offload.py)."""
        vocab = self.state.llm.input_processor.model.vocab_size
        sampled = logprob_entries(num_tokens, body.top_logprobs or 0, vocab) if body.logprobs else 0
        return sampled + logprob_entries(num_prompt, body.prompt_logprobs, vocab)

    def _response(
        self,
        rid: str,
        created: int,
        body: ChatCompletionRequest,
        out: RequestOutput,
        tools: str | None,
        forced: tuple[Any, str | None] | None,
        echo: str,
    ) -> dict[str, Any]:
        rp = self.state.config.reply_reasoning_parser(body.chat_template_kwargs)
        names = self.state.token_names(body.return_tokens_as_token_ids)
        choices = []
        for c in out.outputs:
            lps = None
            if body.logprobs:
                lps = {
                    "content": chat_logprobs(names, c.token_ids, c.logprobs or [], body.top_logprobs or 0),
                    "refusal": None,
                }
            # a forced reply is only calls, also when max_tokens cut it (forced_tools.py): never its JSON as text
            reader = ReplyReader(rp, tools, forced, body.tools, calls_only=True)
            reasoning, content, calls = reader.whole(c.text)
            if forced is not None and not content:
                content = None
            content = echo + (content or "") if echo else content
            message = {"role": "assistant", "content": content, "refusal": None,
                       "tool_calls": [call.json() for call in calls]}  # fmt: skip
            if rp:
                message["reasoning_content"] = reasoning
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": lps,
                    "finish_reason": _finish(c.finish_reason, bool(calls), forced),
                    "stop_reason": c.stop_reason,
                    **({"token_ids": list(c.token_ids)} if body.return_token_ids else {}),
                }
            )
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        response = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.state.response_model(body.model),
            "choices": choices,
            "usage": usage(len(out.prompt_token_ids), completion_tokens, out.num_cached_tokens or 0),
        }
        if body.prompt_logprobs is not None:  # vLLM's extra, over the rendered chat prompt
            response["prompt_logprobs"] = prompt_logprobs_json(self.texts, out.prompt_logprobs)
        if body.return_token_ids:  # vLLM's extra: the rendered prompt's ids
            response["prompt_token_ids"] = list(out.prompt_token_ids)
        return response

    async def _stream(
        self,
        rid: str,
        created: int,
        body: ChatCompletionRequest,
        prompt_ids: list[int],
        gen: AsyncIterator[RequestOutput],
        tools: str | None,
        forced: tuple[Any, str | None] | None,
        echo: str,
    ) -> AsyncIterator[str]:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and bool(
            body.stream_options and body.stream_options.continuous_usage_stats
        )
        model = self.state.response_model(body.model)

        def chunk(choices: list[dict[str, Any]], first: bool = False, heavy: bool = False) -> str:
            data: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if first and body.return_token_ids:  # vLLM's extra: the prompt's ids in the first chunk
                data["prompt_token_ids"] = list(prompt_ids)
            if include_usage:  # continuous_usage_stats (vLLM): the running usage in every chunk
                data["usage"] = usage(len(prompt_ids), completion_tokens, cached) if continuous else None
            return sse_text(data) if heavy else sse(data)

        rp = self.state.config.reply_reasoning_parser(body.chat_template_kwargs)
        names = self.state.token_names(body.return_tokens_as_token_ids)
        reader = ReplyReader(rp, tools, forced, body.tools, calls_only=True)  # calls_only: for a forced reply
        parsers = {i: p for i in range(body.n) if (p := reader.stream()) is not None}
        completion_tokens, cached = 0, 0
        try:
            for i in range(body.n):
                opening = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}  # fmt: skip
                yield chunk([opening], first=i == 0)
            for i in range(body.n) if echo else ():
                yield chunk(
                    [{"index": i, "delta": {"content": echo}, "logprobs": None, "finish_reason": None}]
                )
            async for out in gen:
                cached = max(cached, out.num_cached_tokens or 0)
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    finish = finish_str(c.finish_reason)
                    heavy = is_heavy(self._entries(body, len(c.token_ids)))  # whole-vocabulary logprobs
                    lps = None
                    if body.logprobs and c.token_ids:
                        content = await off_loop(heavy, chat_logprobs, names, c.token_ids, c.logprobs or [],
                                                 body.top_logprobs or 0)  # fmt: skip
                        lps = {"content": content, "refusal": None}
                    delta = chat_delta(parsers.get(c.index), c.text, finish)
                    if (
                        not delta
                        and finish is None
                        and lps is None
                        and not (body.return_token_ids and c.token_ids)
                    ):
                        continue
                    if parsers and finish is not None:
                        finish = _finish(finish, bool(parsers[c.index].num_calls), forced)
                    choice: dict[str, Any] = {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": lps,
                        "finish_reason": finish,
                    }
                    if finish is not None:
                        choice["stop_reason"] = c.stop_reason
                    if body.return_token_ids:  # vLLM's extra: the ids this chunk adds
                        choice["token_ids"] = list(c.token_ids)
                    yield await off_loop(heavy, chunk, [choice], False, heavy)
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage(len(prompt_ids), completion_tokens, cached)})  # fmt: skip
        except Exception as e:
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"


def echoed(body: ChatCompletionRequest, messages: list[dict[str, Any]]) -> str:
    """vLLM's `echo` on chat: the last message's text opens each reply when that message is in the reply's role
    (the assistant's after a generation prompt, else the last message's own: the reply continues it)."""
    last = messages[-1]
    if not body.echo or (body.add_generation_prompt and last.get("role") != "assistant"):
        return ""
    return flatten_content(last.get("content"))


def _finish(reason: str | None, called: bool, forced: tuple[Any, str | None] | None) -> str | None:
    """OpenAI's finish_reason: tool_calls when the reply's calls were parsed or required, stop for a forced
    named function; length whenever max_tokens cut the reply (a call cut short keeps the arguments written)."""
    if not called or reason == "length":
        return finish_str(reason)
    return "stop" if forced is not None and forced[1] is not None else "tool_calls"
