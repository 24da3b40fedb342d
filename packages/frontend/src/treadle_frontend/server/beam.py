"""`use_beam_search` on /v1/completions and /v1/chat/completions, as vLLM's server runs it.

`n` is the beam width; `length_penalty`, `ignore_eos`, `include_stop_str_in_output` and `temperature` (unset: the
model's generation_config.json default, else 1.0) go to BeamSearchParams; like vLLM, the other sampling fields
(top_p, top_k, min_p, penalties, seed, logit_bias, stop, stop_token_ids, min_tokens, bad_words) are ignored. What
would silently break a request's contract is a 400 instead: allowed_token_ids and structured outputs (vLLM's
newest filters its candidates by them; this search cannot), best_of other than n, and 2 * n above the server's
--max-logprobs (each step asks for 2 * n logprobs). Each prompt's search runs from asyncio, its beams' one-token
requests sent together each step (beam_search.py has the algorithm), and yields one final RequestOutput whose n
completions are the best sequences, best first. A completion's text leaves a final EOS out; its token_ids keep it
only with include_stop_str_in_output; its logprobs are, per token, that step's candidates; finish_reason is "stop"
(EOS, with stop_reason its id) or "length". Its prompt_logprobs, when asked (completions' echo with logprobs, vLLM's
prompt_logprobs field), come from the first step, whose one beam is the prompt (vLLM's search returns none, and its
echo with logprobs then fails). The routes format it like any final output: usage counts those token_ids, and no
prompt tokens as cached. Streamed, completions send that whole response as one event and chat
sends each choice's whole text as one chunk (vLLM's two behaviours).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from treadle_frontend.async_llm import AsyncLLM
from treadle_frontend.beam_search import BeamSearch, BeamSearchParams, BeamSearchSequence, first_candidates
from treadle_frontend.logprobs import TokenTexts
from treadle_frontend.outputs import CompletionOutput, RequestOutput
from treadle_frontend.position_logprobs import PositionLogprobs
from treadle_frontend.server.common import ServerState
from treadle_frontend.server.errors import APIError
from treadle_frontend.server.streams import sse
from treadle_model_runner.lora.request import LoRARequest
from treadle_model_runner.sampling_params import SamplingParams, check_num_logprobs, logprobs_limit

# constraints this search cannot keep (vLLM's newest filters its candidates by them): a 400, not ignored
_UNSUPPORTED = (
    "allowed_token_ids",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def length_params(body: Any, max_tokens: int | None) -> SamplingParams:
    """What a route needs of a beam-search request before its search starts: the output length to check against
    the context (None: the rest of it), and how to decode text."""
    return SamplingParams(max_tokens=max_tokens, skip_special_tokens=body.skip_special_tokens)


def beam_searches(
    state: ServerState,
    body: Any,
    encoded: list[tuple[str | None, list[int]]],
    checked: list[SamplingParams],
    request_id: str,
    lora_request: LoRARequest | None = None,
    prompt_logprobs: int | None = None,
) -> list[AsyncIterator[RequestOutput]]:
    """One search per (text, prompt ids), `checked[i]` its length-checked `length_params`, every step under
    `lora_request`'s adapter (None: the base model); `prompt_logprobs`: how many top logprobs each prompt position
    returns (completions' echo with logprobs, vLLM's prompt_logprobs field), computed by the search's first step. A
    request beam search cannot serve is an APIError (400) naming the field, raised here, before anything runs."""
    for name in _UNSUPPORTED:
        if getattr(body, name, None) is not None:
            raise APIError(400, f"{name} cannot be combined with use_beam_search", param=name)
    if (getattr(body, "response_format", None) or {}).get("type", "text") != "text":
        raise APIError(
            400, "response_format cannot be combined with use_beam_search", param="response_format"
        )
    choice = getattr(body, "tool_choice", None)
    if choice == "required" or isinstance(choice, dict):
        raise APIError(
            400, "a forced tool_choice cannot be combined with use_beam_search", param="tool_choice"
        )
    if getattr(body, "best_of", None) not in (None, body.n):
        raise APIError(
            400, f"best_of ({body.best_of}) must equal n ({body.n}), the beam width", param="best_of"
        )
    ip = state.llm.input_processor
    model = ip.model
    limit = logprobs_limit(model.max_logprobs, model.vocab_size)
    # completions' logprobs (an int) or chat's top_logprobs: within the engine's max_logprobs, as without beams
    field = "top_logprobs" if isinstance(getattr(body, "logprobs", None), bool) else "logprobs"
    num_top = getattr(body, field, None)
    if not isinstance(num_top, bool) and isinstance(num_top, int) and not 0 <= num_top <= limit:
        raise APIError(400, f"{field} must be in [0, {limit}], got {num_top}", param=field)
    try:  # the engine's max_logprobs, in vLLM's words
        check_num_logprobs("prompt", prompt_logprobs, model.max_logprobs, model.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt_logprobs") from None
    if 2 * body.n > limit:
        raise APIError(
            400,
            f"n ({body.n}) is too wide a beam: each step asks for the 2 * n most likely next tokens, and this "
            f"server returns at most {limit} logprobs (--max-logprobs); ask for n <= {limit // 2}",
            param="n",
        )
    temperature = body.temperature
    if temperature is None:
        temperature = ip.default_sampling_fields().get("temperature", 1.0)
    eos_token_id = getattr(ip.tokenizer, "eos_token_id", None)
    searches: list[AsyncIterator[RequestOutput]] = []
    for (text, ids), params in zip(encoded, checked, strict=True):
        try:
            beam = BeamSearchParams(
                beam_width=body.n,
                max_tokens=params.max_tokens or 0,
                ignore_eos=body.ignore_eos,
                temperature=temperature,
                length_penalty=body.length_penalty,
                include_stop_str_in_output=body.include_stop_str_in_output,
            )
        except ValueError as e:  # BeamSearchParams names its field: n is the beam width here
            message = str(e).replace("beam_width", "n", 1)
            raise APIError(400, f"with use_beam_search, {message}", param=message.split(" ", 1)[0]) from None
        search = BeamSearch(ids, beam, eos_token_id, beam.max_tokens, prune_by_score=False)  # vLLM's server
        rid = f"{request_id}-{len(searches)}"
        run = _Run(state.llm, rid, body.priority, lora_request, prompt_logprobs)
        searches.append(run.search(search, text, params.skip_special_tokens))
    return searches


@dataclass(frozen=True, slots=True)
class _Run:
    """How one prompt's search sends its one-token requests."""

    llm: AsyncLLM
    request_id: str  # each step's requests are "{request_id}-{step}-{beam}"
    priority: int
    lora_request: LoRARequest | None  # None: the base model
    prompt_logprobs: int | None  # asked of the first step (its one beam is the prompt); None: not asked

    async def search(
        self, search: BeamSearch, text: str | None, skip_special: bool
    ) -> AsyncIterator[RequestOutput]:
        """Runs `search` to its end (each step, one one-token request per live beam, all sent at once), then
        yields its result as one final RequestOutput, with the prompt's logprobs when they were asked."""
        step_params = search.params.step_params()
        prompt_logprobs = None
        step = 0
        while not search.is_done:
            params = step_params.clone(prompt_logprobs=self.prompt_logprobs) if step == 0 else step_params
            requests = [
                self.llm.collect(beam.tokens, params.clone(), request_id=f"{self.request_id}-{step}-{i}",
                                 prompt_token_ids=beam.tokens, priority=self.priority, lora_request=self.lora_request)
                for i, beam in enumerate(search.beams)
            ]  # fmt: skip
            outs = await asyncio.gather(*requests)
            if step == 0:
                prompt_logprobs = outs[0].prompt_logprobs
            search.advance([first_candidates(out) for out in outs])
            step += 1
        texts = self.llm.input_processor.token_texts
        outputs = [_completion(i, seq, search, texts, skip_special) for i, seq in enumerate(search.best())]
        yield RequestOutput(self.request_id, text, search.prompt_ids, prompt_logprobs, outputs, finished=True)


def _completion(
    index: int, seq: BeamSearchSequence, search: BeamSearch, texts: TokenTexts, skip_special_tokens: bool
) -> CompletionOutput:
    generated = seq.tokens[len(search.prompt_ids) :]
    ended = seq.finish_reason == "stop"
    token_ids = generated[:-1] if ended and not search.params.include_stop_str_in_output else generated
    logprobs = PositionLogprobs(texts)
    for token, candidates in zip(token_ids, seq.logprobs, strict=False):
        # the chosen token first, then the step's top-k in rank order (as the engine lists a position)
        top = sorted(candidates.items(), key=lambda kv: kv[1].rank or 10**9)
        top = [(t, e) for i, (t, e) in enumerate(top, 1) if e.rank == i]  # not a sampled token past the top-k
        ids = [token, *(t for t, _ in top)]
        logprobs.append_position(ids, [candidates[t].logprob for t in ids], candidates[token].rank)
    return CompletionOutput(
        index=index,
        text=texts.decoder.decode(generated[:-1] if ended else generated, skip_special_tokens),
        token_ids=token_ids,
        cumulative_logprob=seq.cum_logprob,
        logprobs=logprobs,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )


def one_event(response: dict[str, Any]) -> StreamingResponse:
    """vLLM's completions with stream and beam search: the whole response as one event, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        yield sse(response)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
