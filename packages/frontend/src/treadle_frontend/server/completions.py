"""POST /v1/completions: one or more prompts, n completions each, streamed or not, with echo and logprobs.

Choice index = prompt index * n + completion index. `logprobs` returns OpenAI's legacy block
`{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`; with `echo` the prompt comes first
(its first token has no logprob: null). `max_tokens: 0` with `echo` is lm-eval's loglikelihood request: the
engine runs one step for the prompt logprobs and the sampled token is dropped. `use_beam_search` runs vLLM's beam
search instead (server/beam.py): the n best sequences per prompt; streamed, the whole response is one event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from treadle_frontend.logprobs import TextOffsets, TokenNames, legacy_logprobs, prompt_logprobs_json
from treadle_frontend.outputs import CompletionOutput, RequestOutput, SampleLogprobs
from treadle_frontend.server.beam import beam_searches, length_params, one_event
from treadle_frontend.server.common import (
    ServerState,
    check_priority,
    new_id,
    prompt_list,
    sampling_params,
    truncate_prompt,
    usage,
)
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.offload import is_heavy, json_reply, logprob_entries, off_loop, sse_text
from treadle_frontend.server.protocol import CompletionRequest
from treadle_frontend.server.streams import (
    collect_all,
    event_stream,
    first_output,
    merge_streams,
    sse,
    until_disconnect,
)
from treadle_model_runner.sampling_params import RequestOutputKind


class CompletionsHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.texts = state.llm.input_processor.token_texts

    async def handle(self, body: CompletionRequest, request: Request) -> Any:
        st = self.state
        st.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.max_tokens is not None and body.max_tokens < 0:
            raise APIError(400, f"max_tokens must be >= 0, got {body.max_tokens}", param="max_tokens")
        if body.logprobs is not None and body.logprobs < 0:  # vLLM takes no -1 (whole vocabulary) here
            raise APIError(400, f"logprobs must be >= 0, got {body.logprobs} (the whole vocabulary, -1, is for "
                                "prompt_logprobs and chat's top_logprobs)", param="logprobs")  # fmt: skip
        drop_output = body.max_tokens == 0
        prompt_lps = body.prompt_logprobs
        if body.echo and body.logprobs is not None and prompt_lps is None:
            prompt_lps = body.logprobs
        kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
        beam = body.use_beam_search  # server/beam.py: most sampling fields are ignored, as vLLM ignores them
        params = length_params(body, body.max_tokens) if beam else sampling_params(
            st, body, max_tokens=1 if drop_output else body.max_tokens, logprobs=body.logprobs,
            prompt_logprobs=prompt_lps, kind=kind,
        )  # fmt: skip
        ip = st.llm.input_processor
        encoded, checked = [], []
        for p in prompt_list(body.prompt, "prompt"):
            if isinstance(p, list) and not all(isinstance(t, int) for t in p):
                raise APIError(
                    400, "prompt must be a string, a list of strings, or token id lists", param="prompt"
                )
            text, ids = ip.encode_prompt(p, add_special_tokens=body.add_special_tokens)
            if body.truncate_prompt_tokens is not None:
                text, ids = None, truncate_prompt(ids, body.truncate_prompt_tokens, ip.model.max_model_len)
            checked.append(ip.check_length(ids, params.clone()))
            encoded.append((text, ids))
        check_priority(st, body.priority)
        rid = new_id("cmpl-")
        lora = st.lora_request(body.model)
        gens = beam_searches(st, body, encoded, checked, rid, lora, prompt_lps) if beam else [
            st.llm.generate(text or ids, params.clone(), f"{rid}-{i}", prompt_token_ids=ids, priority=body.priority,
                            lora_request=lora)
            for i, (text, ids) in enumerate(encoded)
        ]  # fmt: skip
        model, vocab = st.response_model(body.model), ip.model.vocab_size
        names = st.token_names(body.return_tokens_as_token_ids)
        ctx = _Ctx(rid, int(time.time()), model, body, encoded, drop_output, vocab, names)
        if body.stream and not beam:  # the engine's refusal before the first output is an HTTP error
            outputs = await first_output(request, merge_streams(gens))
            return event_stream(request, rid, self._stream(ctx, outputs), outputs)
        finals = await until_disconnect(request, collect_all(gens))
        if body.stream:
            return one_event(self._response(ctx, finals))
        num_tokens = 0 if drop_output else sum(len(c.token_ids) for out in finals for c in out.outputs)
        # every choice carries its prompt's logprobs (echoed, or vLLM's prompt_logprobs field)
        num_prompt = sum(len(out.prompt_token_ids) * len(out.outputs) for out in finals)
        heavy = is_heavy(ctx.entries(num_tokens, num_prompt))
        return await off_loop(heavy, lambda: json_reply(heavy, self._response(ctx, finals)))

    # ---- non-streaming ----------------------------------------------------------------------------
    def _choice(self, ctx: _Ctx, i: int, out: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
        body = ctx.body
        text, ids = c.text, c.token_ids
        lps: SampleLogprobs | None = c.logprobs
        if ctx.drop_output:
            text, ids, lps = "", [], [] if lps is not None else None
        prefix_text = ""
        logprobs = None
        if body.echo:
            prefix_text = self._prompt_text(out)
        if body.logprobs is not None:
            num_top = body.logprobs
            gen = legacy_logprobs(
                ctx.names, ids, lps or [], num_top, TextOffsets(self.texts, len(prefix_text))
            )
            logprobs = gen
            if body.echo:  # the prompt's block first
                plps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                block = legacy_logprobs(
                    ctx.names, out.prompt_token_ids, plps, num_top, TextOffsets(self.texts, 0)
                )
                logprobs = {k: block[k] + gen[k] for k in block}
        choice = {
            "index": i * body.n + c.index,
            "text": prefix_text + text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason if c.finish_reason in ("stop", "length") else "stop",
            "stop_reason": c.stop_reason,
        }
        if body.prompt_logprobs is not None:  # vLLM's extra, per choice
            choice["prompt_logprobs"] = prompt_logprobs_json(self.texts, out.prompt_logprobs)
        if body.return_token_ids:  # vLLM's extra, per choice: the prompt's and the generated ids
            choice["prompt_token_ids"], choice["token_ids"] = list(out.prompt_token_ids), list(ids)
        return choice

    def _prompt_text(self, out: RequestOutput) -> str:
        """The prompt as echo writes it: its text, or its ids decoded."""
        return (
            out.prompt if out.prompt is not None else self.texts.decoder.decode(out.prompt_token_ids, False)
        )

    def _response(self, ctx: _Ctx, finals: list[RequestOutput]) -> dict[str, Any]:
        choices, completion_tokens, cached = [], 0, 0
        for i, out in enumerate(finals):
            cached += out.num_cached_tokens or 0
            for c in out.outputs:
                choices.append(self._choice(ctx, i, out, c))
                completion_tokens += 0 if ctx.drop_output else len(c.token_ids)
        choices.sort(key=lambda ch: ch["index"])
        prompt_tokens = sum(len(ids) for _, ids in ctx.encoded)
        return {
            "id": ctx.rid,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached),
        }

    # ---- streaming --------------------------------------------------------------------------------
    async def _stream(
        self, ctx: _Ctx, outputs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[str]:
        """`outputs`: merge_streams' (prompt index, output) pairs."""
        body = ctx.body
        sent = _Sent(include_usage=bool(body.stream_options and body.stream_options.include_usage))
        sent.continuous = sent.include_usage and bool(
            body.stream_options and body.stream_options.continuous_usage_stats
        )
        prompt_tokens = sum(len(ids) for _, ids in ctx.encoded)
        try:
            async for i, out in outputs:
                sent.cached[i] = max(sent.cached.get(i, 0), out.num_cached_tokens or 0)
                for c in out.outputs:
                    index = i * body.n + c.index
                    num_prompt = len(out.prompt_token_ids) if sent.owes_prompt(body, index) else 0
                    heavy = is_heavy(ctx.entries(0 if ctx.drop_output else len(c.token_ids), num_prompt))
                    event = await off_loop(heavy, self._chunk, ctx, sent, index, out, c, prompt_tokens, heavy)
                    if event is not None:
                        yield event
            if sent.include_usage:
                yield sse(
                    {
                        "id": ctx.rid,
                        "object": "text_completion",
                        "created": ctx.created,
                        "model": ctx.model,
                        "choices": [],
                        "usage": usage(prompt_tokens, sent.completion_tokens, sum(sent.cached.values())),
                    }
                )
        except Exception as e:
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    def _chunk(
        self,
        ctx: _Ctx,
        sent: _Sent,
        index: int,
        out: RequestOutput,
        c: CompletionOutput,
        prompt_tokens: int,
        heavy: bool,
    ) -> str | None:
        """Choice `index`'s event for output `c` (None: it adds nothing), `sent` updated; `heavy`: serialised in
        slices (offload.py), as this then runs in a worker thread."""
        body = ctx.body
        text, ids = c.text, c.token_ids
        lps: SampleLogprobs | None = c.logprobs
        if ctx.drop_output:
            text, ids, lps = "", [], [] if lps is not None else None
        sent.completion_tokens += len(ids)
        prefix = ""
        block = None
        if body.echo and index not in sent.echoed:
            sent.echoed.add(index)
            prefix = self._prompt_text(out)
            if body.logprobs is not None:
                plps = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                block = legacy_logprobs(ctx.names, out.prompt_token_ids, plps, body.logprobs,
                                        TextOffsets(self.texts, 0))  # fmt: skip
        if body.logprobs is not None:
            tracker = sent.trackers.setdefault(index, TextOffsets(self.texts, len(prefix)))
            gen = legacy_logprobs(ctx.names, ids, lps or [], body.logprobs, tracker)
            block = {k: (block[k] if block else []) + gen[k] for k in gen}
        finish = c.finish_reason if c.finish_reason in ("stop", "length", None) else "stop"
        if not (prefix or text or finish or (block and block["tokens"]) or (body.return_token_ids and ids)):
            return None
        choice = {
            "index": index,
            "text": prefix + text,
            "logprobs": block,
            "finish_reason": finish,
            "stop_reason": c.stop_reason if finish else None,
        }
        if body.prompt_logprobs is not None and index not in sent.prompt_sent and out.prompt_logprobs:
            sent.prompt_sent.add(index)  # once per choice, in its first chunk that has them
            choice["prompt_logprobs"] = prompt_logprobs_json(self.texts, out.prompt_logprobs)
        if body.return_token_ids:  # vLLM's extra: the prompt's ids in a choice's first chunk
            if index not in sent.ids_sent:
                sent.ids_sent.add(index)
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = list(ids)  # the ids this chunk adds
        chunk: dict[str, Any] = {
            "id": ctx.rid,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [choice],
        }
        if sent.include_usage:  # continuous_usage_stats (vLLM): the running usage in every chunk
            running = usage(prompt_tokens, sent.completion_tokens, sum(sent.cached.values()))
            chunk["usage"] = running if sent.continuous else None
        return sse_text(chunk) if heavy else sse(chunk)


@dataclass(slots=True)
class _Sent:
    """What a completions stream has sent so far."""

    include_usage: bool  # stream_options.include_usage
    continuous: bool = False  # stream_options.continuous_usage_stats: the running usage in every chunk
    echoed: set[int] = field(default_factory=set)  # choices whose prompt went out (echo)
    prompt_sent: set[int] = field(default_factory=set)  # choices whose prompt_logprobs went out
    ids_sent: set[int] = field(
        default_factory=set
    )  # choices whose prompt_token_ids went out (return_token_ids)
    trackers: dict[int, TextOffsets] = field(default_factory=dict)  # per choice: its tokens' text offsets
    completion_tokens: int = 0
    cached: dict[int, int] = field(default_factory=dict)  # prefix-cache hits per prompt

    def owes_prompt(self, body: Any, index: int) -> bool:
        """Whether choice `index`'s next chunk may carry its prompt (echo, or the prompt_logprobs field)."""
        return (body.echo and index not in self.echoed) or (
            body.prompt_logprobs is not None and index not in self.prompt_sent
        )


@dataclass(slots=True)
class _Ctx:
    """One completions request as its reply is built."""

    rid: str
    created: int  # unix seconds
    model: str  # the name the reply carries
    body: Any  # the CompletionRequest
    encoded: list[tuple[str | None, list[int]]]  # per prompt: (its text or None, its token ids)
    drop_output: bool  # max_tokens 0: the prompt only (echo), the sampled token dropped
    vocab_size: int
    names: TokenNames  # how logprobs name tokens (their text, or "token_id:{id}")

    def entries(self, num_tokens: int, num_prompt: int) -> int:
        """The logprob entries a choice's chunk (or a reply) builds for `num_tokens` generated tokens and
        `num_prompt` prompt tokens (echoed with logprobs, and vLLM's prompt_logprobs field): offload.py."""
        body, vocab = self.body, self.vocab_size
        echoed = body.echo and body.logprobs is not None
        echo_top = body.prompt_logprobs if body.prompt_logprobs is not None else body.logprobs
        return (
            logprob_entries(num_tokens, body.logprobs, vocab)
            + (logprob_entries(num_prompt, echo_top, vocab) if echoed else 0)
            + logprob_entries(num_prompt, body.prompt_logprobs, vocab)
        )
