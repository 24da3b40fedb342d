"""RequestState: one engine request's text, tokens and logprobs as the frontend accumulates them.

The engine sends token ids; this turns each step's ids into text (incremental detokenizer), ends the request
at stop strings (the engine never sees them), decodes logprobs, and builds the CompletionOutput the caller's
output kind asks for:
- CUMULATIVE: everything so far; DELTA: only what is new since the last output; FINAL_ONLY: once, at the end.
Text that could still become a stop string is withheld until it is ruled out (see stop_strings).

A request with `detokenize=False` skips all of that text work, as vLLM does: its outputs carry the token ids,
text "" and logprobs whose decoded_token is None (it cannot have stop strings: SamplingParams refuses them).

Invariant: the concatenation of every DELTA text equals the final CUMULATIVE text, and a finished request
emits exactly one output with `finish_reason` set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from treadle_frontend.detokenizer import IncrementalDetokenizer, TokenDecoder
from treadle_frontend.logprobs import TokenTexts
from treadle_frontend.outputs import CompletionOutput, RequestMetrics
from treadle_frontend.position_logprobs import PositionLogprobs, PromptPositionLogprobs
from treadle_frontend.stop_strings import StopStringChecker
from treadle_model_runner.sampling_params import RequestOutputKind, SamplingParams


def finish_reason_str(value: Any) -> str | None:
    """The engine's finish reason (enum, int-enum or string) as the API string: stop | length | abort."""
    if value is None:
        return None
    name = value if isinstance(value, str) else getattr(value, "name", str(value))
    name = str(name).lower()
    if name in ("eos", "stop_token", "stopped", "finished_stopped"):
        return "stop"
    if name in ("max_tokens", "max_model_len", "finished_length_capped"):
        return "length"
    if name in ("aborted", "finished_aborted"):
        return "abort"
    if name in ("finished_error", "failed"):
        return "error"
    return name


@dataclass(slots=True)
class EngineStep:
    """One request's share of one engine step (normalized from EngineCoreOutput)."""

    new_token_ids: list[int]
    new_logprobs: Any = None
    new_prompt_logprobs: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    pooled: list[float] | None = None  # the embedding, for a request that asked for one


@dataclass(slots=True)
class RequestState:
    request_id: str  # the engine's id (a child id for n > 1)
    parent_id: str  # the caller's id
    index: int  # completion index among the parent's n
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None  # None: detokenize=False, the text stays ""
    stop_checker: StopStringChecker
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # output text so far, cut at a stop string
    num_sent_chars: int = 0  # DELTA: text characters already handed out
    num_sent_tokens: int = 0  # DELTA: token ids already handed out
    logprobs: PositionLogprobs | None = None
    prompt_logprobs: PromptPositionLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    embedding: list[float] | None = None  # SamplingParams.pooling: the prompt's embedding, once computed
    # FINAL_ONLY without stop strings: nobody reads the text before the end, so the ids wait here and are decoded
    # once, when the request finishes
    unread_ids: list[int] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        request_id: str,
        parent_id: str,
        index: int,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        decoder: TokenDecoder,
        token_texts: TokenTexts,
        arrival_time: float | None = None,
    ) -> RequestState:
        texts = token_texts if params.detokenize else None
        return cls(
            request_id=request_id,
            parent_id=parent_id,
            index=index,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            detokenizer=IncrementalDetokenizer(decoder, prompt_token_ids, params.skip_special_tokens)
            if params.detokenize
            else None,
            stop_checker=StopStringChecker(params.stop, params.include_stop_str_in_output),
            metrics=RequestMetrics(arrival_time=arrival_time or time.time()),
            logprobs=PositionLogprobs(texts) if params.logprobs is not None else None,
            prompt_logprobs=PromptPositionLogprobs(texts) if params.prompt_logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, step: EngineStep) -> bool:
        """Applies one engine step; returns True when a stop string ended the request here."""
        now = time.time()
        m = self.metrics
        if step.new_token_ids:
            if m.first_token_time is None:
                m.first_token_time = now
            elif m.last_token_time is not None:
                m.inter_token_latencies.append(now - m.last_token_time)
            m.last_token_time = now
        self.num_cached_tokens = max(self.num_cached_tokens, step.num_cached_tokens or 0)
        if step.pooled is not None:
            self.embedding = step.pooled
        self._add_logprobs(step)
        new_ids = list(step.new_token_ids)
        self.token_ids.extend(new_ids)
        if self.detokenizer is None:  # token ids only: no text, so no stop string either
            if step.finish_reason is not None:
                self.finish_reason, self.stop_reason = step.finish_reason, step.stop_reason
                m.finished_time = now
            return False
        engine_stop = step.finish_reason == "stop"
        detok_ids = new_ids
        token_deltas: list[str] = []  # the text each searched token made final (incremental path)
        if engine_stop and new_ids and not self.params.include_stop_str_in_output:
            detok_ids = new_ids[:-1]  # EOS / stop token: not part of the text
        if self.params.output_kind == RequestOutputKind.FINAL_ONLY and not self.params.stop:
            self.unread_ids.extend(detok_ids)
            if step.finish_reason is None:
                return False
            delta = self.detokenizer.update_at_once(self.unread_ids)
            self.unread_ids = []
        else:
            # No stop string ends within the first min_tokens tokens (as vLLM: their text is never searched). A
            # step may bring several tokens (speculative decoding) on both sides of that line: the text of those
            # within min_tokens is added unsearched.
            num_unsearched = min(
                len(detok_ids), max(0, self.params.min_tokens - (len(self.token_ids) - len(new_ids)))
            )
            if num_unsearched:
                self.text += self.detokenizer.update(detok_ids[:num_unsearched])
            token_deltas = self.detokenizer.update_each(detok_ids[num_unsearched:])
            delta = "".join(token_deltas)
        if step.finish_reason is not None:
            delta += self.detokenizer.flush()
        searched_from = len(self.text)
        self.text += delta
        stopped_here = False
        searched = len(delta) if len(self.token_ids) > self.params.min_tokens else 0
        match = self.stop_checker.find(self.text, searched)
        if match is not None:
            if (
                len(new_ids) > 1
            ):  # several tokens this step (speculative decoding): none after the stop string's
                self._drop_after(match.end - searched_from, token_deltas, len(new_ids) - num_unsearched)
            self.text = self.text[: match.truncate_to]
            self.finish_reason, self.stop_reason = "stop", match.stop
            stopped_here = step.finish_reason is None
        elif step.finish_reason is not None:
            self.finish_reason, self.stop_reason = step.finish_reason, step.stop_reason
        if self.finish_reason is not None:
            m.finished_time = now
        return stopped_here

    def _drop_after(self, reach: int, token_deltas: list[str], num_searched: int) -> None:
        """A stop string ends `reach` characters into this step's searched text: the request ends with the token
        whose text reaches it (as one token a step would), so the step's tokens after that one are dropped from
        the ids and logprobs. `token_deltas`: each searched token's text; `num_searched`: this step's tokens from
        the first searched one (an EOS after the texts included)."""
        used, keep = 0, None
        for j, piece in enumerate(token_deltas, 1):
            used += len(piece)
            if used >= reach:
                keep = j
                break
        if keep is None:
            return  # reached only by text the end of the request flushed: every token counts
        drop = num_searched - keep
        if drop > 0:
            del self.token_ids[-drop:]
            if self.logprobs is not None:
                dropped = self.logprobs.truncate(len(self.logprobs) - drop)
                if self.cumulative_logprob is not None:
                    self.cumulative_logprob -= sum(dropped)

    def _add_logprobs(self, step: EngineStep) -> None:
        # stored flat; each position's dict is built when read
        if self.logprobs is not None and step.new_logprobs:
            self.cumulative_logprob = self.logprobs.append_engine(step.new_logprobs, self.cumulative_logprob)
        if self.prompt_logprobs is not None and step.new_prompt_logprobs:
            self.prompt_logprobs.positions.append_engine(step.new_prompt_logprobs, None)

    def make_output(self) -> CompletionOutput | None:
        """The CompletionOutput this step owes the caller, or None when there is nothing to send."""
        kind = self.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        visible = len(self.text) if self.finished else len(self.text) - self.stop_checker.holdback(self.text)
        if kind == RequestOutputKind.DELTA:
            text = self.text[self.num_sent_chars : visible]
            ids = self.token_ids[self.num_sent_tokens :]
            lps = self.logprobs[self.num_sent_tokens :] if self.logprobs is not None else None
            if not text and not ids and not self.finished:
                return None
            self.num_sent_chars = max(self.num_sent_chars, visible)
            self.num_sent_tokens = len(self.token_ids)
        else:
            text, ids = self.text[:visible], list(self.token_ids)
            lps = self.logprobs.copy() if self.logprobs is not None else None
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=ids,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=lps,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
