"""OutputProcessor: engine outputs (token ids per request) in, RequestOutputs (text) out.

It owns one RequestState per engine request. A request with `n > 1` is fanned out by the InputProcessor into
n child engine requests (`"{i}_{parent_id}"`); a ParentRequest here gathers their outputs back under the
parent's id:
- DELTA: each child's delta goes out as it comes (a RequestOutput with that one CompletionOutput);
- CUMULATIVE: the latest CompletionOutput of every child that has produced something, sorted by index;
- FINAL_ONLY: one RequestOutput with all n completions once the last child finishes.
`finished` is True only on the parent's last output.

Stop strings are found here, so the engine does not know a request ended: such requests are returned in
`reqs_to_abort` and the caller aborts them in the engine. Per-step statistics (time to first token, inter-token
latency, end-to-end latency, token counts) are collected into IterationStats for the metrics layer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from treadle_frontend.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from treadle_frontend.request_state import EngineStep, RequestState, finish_reason_str
from treadle_model_runner.sampling_params import RequestOutputKind


@dataclass(slots=True)
class FinishedRequestStats:
    finish_reason: str  # stop | length | abort
    e2e_latency: float  # seconds from arrival to finish
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(slots=True)
class IterationStats:
    num_prompt_tokens: int = 0  # prompt tokens of requests that got their first token this step
    num_generation_tokens: int = 0  # tokens generated this step
    time_to_first_tokens: list[float] = field(default_factory=list)  # seconds
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds
    finished: list[FinishedRequestStats] = field(default_factory=list)


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput]  # for callers without a per-request queue (offline LLM)
    reqs_to_abort: list[str]  # engine ids ended by a stop string: abort them in the engine
    stats: IterationStats


@dataclass(slots=True)
class ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    output_kind: RequestOutputKind
    latest: dict[int, CompletionOutput] = field(default_factory=dict)  # index -> latest completion
    num_finished: int = 0
    queue: asyncio.Queue[RequestOutput | BaseException] | None = None  # AsyncLLM: where outputs go
    children: list[str] = field(default_factory=list)  # engine request ids
    prompt_logprobs: PromptLogprobs | None = None  # from child 0, the one that computes them
    num_cached_tokens: int = 0  # prefix-cache hits of the prompt (max over children)


class OutputProcessor:
    def __init__(self) -> None:
        self.states: dict[str, RequestState] = {}  # engine request id -> state
        self.parents: dict[str, ParentRequest] = {}  # caller request id -> parent
        self.failed: list[BaseException] = []  # engine failures of requests without a queue (offline LLM)

    @property
    def num_unfinished(self) -> int:
        return len(self.parents)

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def add_request(self, parent: ParentRequest, children: list[RequestState]) -> None:
        if parent.request_id in self.parents:
            raise ValueError(f"request id {parent.request_id!r} is already running; use a unique request id")
        parent.children = [c.request_id for c in children]
        self.parents[parent.request_id] = parent
        for child in children:
            self.states[child.request_id] = child

    def abort_requests(
        self, request_ids: list[str], finished: list[FinishedRequestStats] | None = None
    ) -> list[str]:
        """Forgets the given caller ids (or engine ids); returns the engine ids still to abort in the engine.
        ``finished`` (if given) gets the stats of each engine request forgotten, with finish reason abort."""
        forgotten: list[RequestState] = []
        for rid in request_ids:
            parent = self.parents.pop(rid, None)
            if parent is not None:
                states = (self.states.pop(child, None) for child in parent.children)
                forgotten += [state for state in states if state is not None]
            elif rid in self.states:
                state = self.states.pop(rid)
                forgotten.append(state)
                self.parents.pop(state.parent_id, None)
        if finished is not None:
            now = time.time()
            finished += [
                FinishedRequestStats(
                    "abort", now - s.metrics.arrival_time, len(s.prompt_token_ids), len(s.token_ids)
                )
                for s in forgotten
            ]
        return [state.request_id for state in forgotten]

    def fail_all(self, error: BaseException) -> None:
        """The engine died: every waiting caller gets the error; all state is dropped."""
        for parent in self.parents.values():
            if parent.queue is not None:
                parent.queue.put_nowait(error)
        self.parents.clear()
        self.states.clear()

    def _fail(self, state: RequestState, reason: str | None) -> None:
        """The engine rejected this request: its caller gets a ValueError (HTTP 400) with the engine's reason (a
        RuntimeError when it gave none), its siblings are dropped."""
        del self.states[state.request_id]
        parent = self.parents.pop(state.parent_id, None)
        if parent is None:
            return
        for child in parent.children:
            self.states.pop(child, None)
        error: Exception = (
            ValueError(reason)
            if reason
            else RuntimeError(
                f"the engine failed while generating request {parent.request_id!r}; see the server log"
            )
        )
        if parent.queue is not None:
            parent.queue.put_nowait(error)
        else:
            self.failed.append(error)

    def process_outputs(self, engine_outputs: list[Any]) -> ProcessedOutputs:
        stats = IterationStats()
        request_outputs: list[RequestOutput] = []
        reqs_to_abort: list[str] = []
        for eo in engine_outputs:
            state = self.states.get(eo.request_id)
            if state is None:
                continue  # aborted meanwhile
            step = EngineStep(
                new_token_ids=list(eo.new_token_ids or []),
                new_logprobs=getattr(eo, "new_logprobs", None),
                new_prompt_logprobs=getattr(eo, "new_prompt_logprobs", None),
                finish_reason=finish_reason_str(getattr(eo, "finish_reason", None)),
                stop_reason=getattr(eo, "stop_reason", None),
                num_cached_tokens=getattr(eo, "num_cached_tokens", 0) or 0,
                pooled=getattr(eo, "pooled", None),
            )
            had_first = state.metrics.first_token_time is not None
            if state.update(step):
                reqs_to_abort.append(state.request_id)
            self._record_stats(state, step, had_first, stats)
            if state.finish_reason == "error":
                self._fail(state, getattr(eo, "error", None))
                continue
            completion = state.make_output()
            if state.finished:
                del self.states[state.request_id]
            if completion is None:
                continue
            out = self._aggregate(state, completion)
            if out is not None:
                parent = self.parents.get(state.parent_id)
                if out.finished:
                    self.parents.pop(state.parent_id, None)
                if parent is not None and parent.queue is not None:
                    parent.queue.put_nowait(out)
                else:
                    request_outputs.append(out)
        return ProcessedOutputs(request_outputs, reqs_to_abort, stats)

    def _aggregate(self, state: RequestState, completion: CompletionOutput) -> RequestOutput | None:
        parent = self.parents.get(state.parent_id)
        if parent is None:
            return None
        if completion.finish_reason is not None:
            parent.num_finished += 1
        if state.prompt_logprobs is not None:
            parent.prompt_logprobs = state.prompt_logprobs
        parent.num_cached_tokens = max(parent.num_cached_tokens, state.num_cached_tokens)
        all_done = parent.num_finished >= parent.n
        kind = parent.output_kind
        if kind == RequestOutputKind.DELTA:
            outputs = [completion]
        else:
            parent.latest[completion.index] = completion
            if kind == RequestOutputKind.FINAL_ONLY and not all_done:
                return None
            outputs = [parent.latest[i] for i in sorted(parent.latest)]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=parent.prompt_logprobs,
            outputs=outputs,
            finished=all_done,
            num_cached_tokens=parent.num_cached_tokens,
            metrics=state.metrics,
            embedding=state.embedding,
        )

    @staticmethod
    def _record_stats(state: RequestState, step: EngineStep, had_first: bool, stats: IterationStats) -> None:
        m = state.metrics
        n_new = len(step.new_token_ids)
        stats.num_generation_tokens += n_new
        if n_new and not had_first and m.first_token_time is not None:
            stats.num_prompt_tokens += len(state.prompt_token_ids)
            stats.time_to_first_tokens.append(m.first_token_time - m.arrival_time)
        elif n_new and m.inter_token_latencies:
            stats.inter_token_latencies.append(m.inter_token_latencies[-1])
        if state.finish_reason is not None:
            stats.finished.append(
                FinishedRequestStats(
                    finish_reason=state.finish_reason,
                    e2e_latency=(m.finished_time or time.time()) - m.arrival_time,
                    num_prompt_tokens=len(state.prompt_token_ids),
                    num_generation_tokens=len(state.token_ids),
                )
            )
