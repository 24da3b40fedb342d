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
Speculative decoding: a request verifying drafts owns one logits row per position; row j is masked as if its first
j drafts were outputs, by a fork of its matcher that follows the drafts (`_mask_drafts`). A draft the grammar
refuses ends verification there: the sample at its position is still taken (and obeys the grammar), later drafts
are dropped. So a speculative reply obeys the grammar exactly as a plain one does.
A thinking model's reasoning is unconstrained (`_grammar_start`): the grammar starts after qwen3's / deepseek_r1's
end token, or after the first run of a harmony reply's header ids (gpt-oss's `<|channel|>final<|message|>`,
several tokens); a forced harmony header (a forced tool call's) is written one allowed token a step first.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from treadle_model_runner.runner.forced_call import stage
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

    def mask(
        self,
        states: Sequence[RequestState],
        logits: torch.Tensor,
        drafts: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Mask `logits` in place: row j to what request `states[j]`'s grammar allows next (other rows untouched).
        With `drafts` (speculative decoding) request i owns 1 + len(drafts[i]) consecutive rows, its row j masked to
        what its grammar allows once drafts[i][:j] follow its outputs (`_mask_drafts`)."""
        constrained = [i for i, s in enumerate(states) if s.sampling_params.structured_outputs is not None]
        if not constrained:
            return
        xgr = import_xgrammar()
        counts = [1] * len(states) if drafts is None else [1 + len(d) for d in drafts]
        first = list(itertools.accumulate(counts, initial=0))  # request -> its first row
        pinned = logits.is_cuda
        # xgrammar's layout (allocate_token_bitmask): int32 words of 32 tokens, -1 = every token allowed
        bitmask = torch.full((first[-1], -(-self.vocab_size // 32)), -1, dtype=torch.int32, pin_memory=pinned)
        plain = {first[i]: states[i] for i in constrained if counts[i] == 1}
        for j, state in plain.items():
            self._force(state, bitmask[j])
        fill: dict[int, Any] = {}  # row -> its matcher, filled together below (xgrammar's threads)
        for j in self._advance_all(list(plain.items())):
            if plain[j].grammar_ended:  # past the end (ignore_eos, min_tokens): only EOS fits the grammar
                self._set_only(bitmask[j], self.eos_token_ids)
            else:
                fill[j] = plain[j].grammar
        if len(fill) == 1:
            j, matcher = next(iter(fill.items()))
            matcher.fill_next_token_bitmask(bitmask, j)
        elif fill:
            if self._batch_matcher is None:
                self._batch_matcher = xgr.BatchGrammarMatcher()
            self._batch_matcher.batch_fill_next_token_bitmask(list(fill.values()), bitmask, list(fill))
        for j in fill:
            self._allow_opening(plain[j], bitmask[j])
        for i in constrained:
            if counts[i] > 1:
                assert drafts is not None
                self._mask_drafts(states[i], drafts[i], bitmask, first[i])
        rows = [first[i] + j for i in constrained for j in range(counts[i])]
        indices: Any = rows  # on a GPU: a pinned copy, so the upload does not wait on the host either
        if pinned:
            indices = torch.tensor(rows, dtype=torch.int32, pin_memory=True).to(
                logits.device, non_blocking=True
            )
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size, indices=indices
        )

    def _mask_drafts(
        self, state: RequestState, drafts: Sequence[int], bitmask: torch.Tensor, first: int
    ) -> None:
        """Rows first .. first + k of `bitmask`: what the grammar allows after the outputs and drafts[:j].

        The matcher catches up with the outputs as in a step without drafts; then a fork of it follows the drafts
        while each is allowed at its row. The first draft its row refuses is where verification stops (the sample
        there cannot equal it), so the rows after it stay unconstrained: their samples are never kept. Afterwards
        the request's matcher and outputs are as before the walk."""
        self._mask_one(state, bitmask, first)
        saved = (state.grammar, state.grammar_accepted, state.grammar_ended)
        if saved[0] is not None and saved[0] is not False:
            state.grammar = saved[0].fork()
        out = state.output_token_ids
        num_outputs = len(out)
        try:
            for j, token in enumerate(drafts):
                word = int(bitmask[first + j, token // 32])
                if not (word >> (token % 32)) & 1:
                    break
                out.append(token)
                self._mask_one(state, bitmask, first + j + 1)
        finally:
            del out[num_outputs:]
            state.grammar, state.grammar_accepted, state.grammar_ended = saved

    def _mask_one(self, state: RequestState, bitmask: torch.Tensor, row: int) -> None:
        """Bitmask `row`: what the request's grammar allows after its outputs (one row of `mask`)."""
        if self._force(state, bitmask[row]):
            return
        if not self._advance_all([(row, state)]):
            return
        if state.grammar_ended:
            self._set_only(bitmask[row], self.eos_token_ids)
        else:
            state.grammar.fill_next_token_bitmask(bitmask, row)
            self._allow_opening(state, bitmask[row])

    def _force(self, state: RequestState, row: torch.Tensor) -> bool:
        """A forced harmony call's row before its grammar (forced_call.py): its one next token, or any but a stop
        token inside its analysis; False when the request has no such stage now."""
        params = state.sampling_params.structured_outputs
        if params is None or not params.is_header_forced:
            return False
        at = stage(params, state.output_token_ids)
        if at.allowed:
            self._set_only(row, at.allowed)
        elif at.is_free:
            self._set_only(row, self.eos_token_ids, keep=True, value=0)
        return bool(at.allowed) or at.is_free

    def _allow_opening(self, state: RequestState, row: torch.Tensor) -> None:
        """A qwen3 reply's first token may open a reasoning block instead of following the grammar."""
        params = state.sampling_params.structured_outputs
        if params is not None and params.reasoning == "qwen3" and not state.output_token_ids:
            self._set_only(row, [params.think_start_id], keep=True)

    def _set_only(
        self, row: torch.Tensor, tokens: Sequence[int | None], keep: bool = False, value: int = 1
    ) -> None:
        """Allow `tokens` in a bitmask row (int32 words, bit t % 32 of word t // 32): only them, or, with `keep`,
        them too (`value` 0 with `keep`: refuse them, the rest as it was)."""
        if not keep:
            row.zero_()
        for t in tokens:
            if t is None:
                continue
            if 0 <= t < self.vocab_size:
                bit = 1 << (t % 32)
                word = int(row[t // 32]) & 0xFFFFFFFF
                word = word | bit if value else word & ~bit
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
    if params.reasoning == "harmony":
        if state.grammar is not None:  # built once its start was found: the outputs before it are accepted
            return state.grammar_accepted
        if params.is_header_forced:  # where the forced header ends (not a run of its ids inside the analysis)
            return stage(params, out).start
        assert params.reasoning_end_ids is not None, "harmony's params carry their end ids"
        at = _find(out, params.reasoning_end_ids)
        return None if at < 0 else at + len(params.reasoning_end_ids)
    if params.reasoning == "qwen3" and (not out or out[0] != params.think_start_id):
        return 0  # no block opened (the first step allows the opening tag besides the grammar)
    if params.think_end_id in out:
        return out.index(params.think_end_id) + 1
    return None


def _find(out: list[int], ids: tuple[int, ...]) -> int:
    """Where the first run of `ids` begins in `out`, or -1 (list.index finds the candidates in C)."""
    n, at = len(ids), -1
    try:
        while True:
            at = out.index(ids[0], at + 1)
            if tuple(out[at : at + n]) == ids:
                return at
    except ValueError:
        return -1
