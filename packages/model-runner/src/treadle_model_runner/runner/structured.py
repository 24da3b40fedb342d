"""The runner's structured outputs: per request, an xgrammar matcher that follows its sampled tokens, and each
step's logits masked to what the grammar allows next.

The vocabulary comes from the model's tokenizer, loaded on the first structured request (`compile`, which
`EngineCore.add_request` calls, so an invalid grammar or a model without a tokenizer fails that request alone
with a ValueError). Compiled grammars are cached by their `key()`. A request's matcher lives in its
RequestState: it is built on the request's first sampling step and replays the outputs the request already has
(a preempted request is re-sent in full and starts a new state), then accepts each new output token before the
step masks its row. Under async scheduling the step that masks was launched before the previous step's tokens
reached the host; the runner resolves them just before `mask` (runner/sampling.py), so no output is a
placeholder here. The bitmask goes to the device from pinned memory without a host wait, so the host never
waits for the forward it masks. A matcher ends by accepting a stop token, so termination is asked of xgrammar
only then (one call a token instead of three: at 256 rows a step spent most of its mask time in those calls).
xgrammar's `batch_accept_token` measured slower than the loop (0.78 against 0.64 ms a step of 256 rows on the
2-core CPU; slower end to end on an H200, session 17 call 4).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.runner.request_state import RequestState
from treadle_model_runner.structured_outputs import StructuredOutputsParams, import_xgrammar

logger = logging.getLogger(__name__)


class StructuredOutputs:
    def __init__(self, tokenizer_path: Path, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._stop_ids = frozenset(self.eos_token_ids)
        self._compiler: Any = None
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()  # add_request (engine thread) and the step (worker thread) both compile
        # xgrammar's BatchGrammarMatcher (made on first use): fills many rows' masks on its threads
        self._batch_matcher: Any = None

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached); ValueError when it is invalid or the model has no tokenizer."""
        key = params.key()
        with self._lock:
            if key not in self._cache:
                grammar = params.build()  # ValueError naming the constraint
                self._cache[key] = self._require_compiler().compile_grammar(grammar)
            return self._cache[key]

    def _require_compiler(self) -> Any:
        if self._compiler is None:
            xgr = import_xgrammar()
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path), local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"structured outputs need the model's tokenizer ({self.tokenizer_path}): {e}"
                ) from None
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids or None
            )
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def mask(self, states: Sequence[RequestState], logits: torch.Tensor) -> None:
        """Mask `logits` [S, V] in place: row j to what request `states[j]`'s grammar allows next (other rows
        untouched)."""
        rows = [j for j, s in enumerate(states) if s.sampling_params.structured_outputs is not None]
        if not rows:
            return
        xgr = import_xgrammar()
        pinned = logits.is_cuda
        # xgrammar's layout (allocate_token_bitmask): int32 words of 32 tokens, -1 = every token allowed
        bitmask = torch.full(
            (len(states), -(-self.vocab_size // 32)), -1, dtype=torch.int32, pin_memory=pinned
        )
        fill: dict[int, Any] = {}  # row -> its matcher, filled together below (xgrammar's threads)
        for j in self._advance_all([(j, states[j]) for j in rows]):
            if states[j].grammar_ended:  # past the end (ignore_eos, min_tokens): only EOS fits the grammar
                self._set_only(bitmask[j], self.eos_token_ids)
            else:
                fill[j] = states[j].grammar
        if len(fill) == 1:
            j, matcher = next(iter(fill.items()))
            matcher.fill_next_token_bitmask(bitmask, j)
        elif fill:
            if self._batch_matcher is None:
                self._batch_matcher = xgr.BatchGrammarMatcher()
            self._batch_matcher.batch_fill_next_token_bitmask(list(fill.values()), bitmask, list(fill))
        for j in fill:
            params = states[j].sampling_params.structured_outputs
            if params is not None and params.reasoning == "qwen3" and not states[j].output_token_ids:
                opening = [params.think_start_id]  # the first token may open a reasoning block instead
                self._set_only(bitmask[j], opening, keep=True)
        indices: Any = rows  # on a GPU: a pinned copy, so the upload does not wait on the host either
        if pinned:
            indices = torch.tensor(rows, dtype=torch.int32, pin_memory=True).to(
                logits.device, non_blocking=True
            )
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size, indices=indices
        )

    def _set_only(self, row: torch.Tensor, tokens: Sequence[int | None], keep: bool = False) -> None:
        """Allow `tokens` in a bitmask row (int32 words, bit t % 32 of word t // 32): only them, or, with `keep`,
        them too."""
        if not keep:
            row.zero_()
        for t in tokens:
            if t is None:
                continue
            if 0 <= t < self.vocab_size:
                word = int(row[t // 32]) | (1 << (t % 32))
                row[t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # as a signed 32-bit value

    def _advance_all(self, rows: list[tuple[int, RequestState]]) -> list[int]:
        """Brings each row's matcher up to its request's outputs; returns the rows whose grammar constrains this
        step (not inside a reasoning block, not abandoned)."""
        ready: list[int] = []
        for j, state in rows:
            start = _grammar_start(state)
            if start is None or (matcher := self._matcher(state, start)) is None:
                continue  # still inside the reasoning block (unconstrained), or abandoned
            if state.grammar_accepted < len(state.output_token_ids):
                self._accept(state, matcher, state.output_token_ids[state.grammar_accepted :])
            if state.grammar is not False:
                ready.append(j)
        return ready

    def _matcher(self, state: RequestState, start: int) -> Any:
        """The request's matcher, built on first use (None once it went astray); its outputs before `start`
        (a reasoning block) count as accepted."""
        if state.grammar is False:
            return None
        if state.grammar is None:
            params = state.sampling_params.structured_outputs
            assert params is not None
            state.grammar = import_xgrammar().GrammarMatcher(self.compile(params))
            state.grammar_accepted = start
        # a qwen3 reply may open its reasoning block at step 0, after the matcher was built: it accepted nothing
        state.grammar_accepted = max(state.grammar_accepted, start)
        return state.grammar

    def _accept(self, state: RequestState, matcher: Any, tokens: list[int]) -> None:
        """Accept `tokens` in order (tokens past the grammar's end, under ignore_eos, are skipped); a refused
        token leaves the request unconstrained."""
        for token in tokens:
            state.grammar_accepted += 1
            if state.grammar_ended:
                continue
            if not matcher.accept_token(token):
                logger.warning(
                    "request %s: token %d is outside its grammar; no longer constrained", state.req_id, token
                )
                state.grammar = False
                return
            if token in self._stop_ids:
                state.grammar_ended = bool(matcher.is_terminated())


def _grammar_start(state: RequestState) -> int | None:
    """Where the constrained part of the reply begins in its outputs, or None while a reasoning block is open."""
    params = state.sampling_params.structured_outputs
    if params is None or params.reasoning is None:
        return 0
    out = state.output_token_ids
    if params.reasoning == "qwen3" and (not out or out[0] != params.think_start_id):
        return 0  # no block opened (the first step allows the opening tag besides the grammar)
    if params.think_end_id in out:
        return out.index(params.think_end_id) + 1
    return None
