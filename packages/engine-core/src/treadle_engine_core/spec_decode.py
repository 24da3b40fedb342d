"""Speculative decoding on the scheduler's side: who drafts, how many drafts fit, and what a verification did.

Theory. A decoding request (num_computed_tokens == num_tokens - 1) normally runs one token, its last sample.
With speculation the proposer (spec_ngram.py) drafts up to k tokens that may follow; the step runs the last
sample plus the drafts (1 + d tokens, KV slots for all of them) and the runner returns 1..d+1 tokens: the drafts
it kept, each equal to its own sample there, then one sample more. So the output equals non-speculative decoding
token for token, and m returned tokens mean m positions of correct KV: num_computed_tokens, advanced by 1 + d
when the step was scheduled, goes back by the d - (m - 1) rejected drafts. Their slots hold stale KV until those
positions are scheduled again; they are never published in the prefix cache, because only blocks full of known
tokens (prompt + output, never drafts) are (kv_cache_manager.py).

Limits on d (no draft that could not be used): the tokens a request may still produce, max_tokens - outputs
and max_model_len - num_tokens, each minus the one sample every step returns anyway; the step's token budget
and long_prefill_token_threshold (applied to 1 + d like any tokens).

Who drafts: every decoding generation request, those under structured outputs too (as vLLM): the runner masks
draft position j with the grammar advanced over the j drafts before it, and a draft the grammar refuses ends the
verification there (model_runner/runner/structured.py). The drafts themselves are not filtered by the grammar.
Pooling requests never draft (the runner refuses drafts for them; the frontend's have max_tokens 0 anyway), and
beam search's one-token requests never have room for one.

Counters follow vLLM's SpecDecodingStats: drafts (verifications with d > 0), draft tokens, accepted tokens and
accepted tokens per draft position, cumulative, reported in SchedulerStats.
"""

from __future__ import annotations

from treadle_engine_core.messages import SchedulerStats
from treadle_engine_core.request import Request
from treadle_engine_core.spec_ngram import NgramProposer
from treadle_engine_core.spec_runner_drafts import RunnerDrafts
from treadle_model_runner.config import SpeculativeConfig


class SpecDecoding:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        # the scheduler's own n-gram proposer, or the drafts the runner's draft model (or EAGLE-3 head) returns with
        # each step
        self.runner_drafts = RunnerDrafts(config.num_speculative_tokens) if config.drafts_in_runner else None
        self.proposer: NgramProposer | RunnerDrafts = self.runner_drafts or NgramProposer(
            config, max_model_len
        )
        self.num_drafts = 0  # verifications of a request's drafts (cumulative)
        self.num_draft_tokens = 0  # draft tokens verified (cumulative)
        self.num_accepted_tokens = 0  # draft tokens kept (cumulative)
        self.num_accepted_tokens_per_pos = [0] * config.num_speculative_tokens  # kept, per draft position

    def propose(self, running: list[Request]) -> dict[str, list[int]]:
        """Drafts for the running requests that are decoding and may use them (request id -> drafts, non-empty);
        a request with a token in flight (async scheduling) has none: its drafts would follow that token."""
        ids, tokens, caps = self._candidates(running, with_in_flight=False)
        if not ids:
            return {}
        drafts = self.proposer.propose(ids, tokens, caps)
        return {rid: d for rid, d in zip(ids, drafts, strict=True) if d}

    def would_draft(self, running: list[Request]) -> bool:
        """Whether some decoding request would get drafts from the tokens known now, its tokens in flight (async
        scheduling) aside: the engine then waits for them instead of scheduling a step without drafts."""
        ids, tokens, caps = self._candidates(running, with_in_flight=True)
        return bool(ids) and self.proposer.would_draft(ids, tokens, caps)

    def store_drafts(self, requests: dict[str, Request], drafts: dict[str, list[int]]) -> None:
        """Keep the drafts a step's output carries (draft_model) for the next schedule, each tagged with the
        request's token count now (after that step's tokens were appended)."""
        assert self.runner_drafts is not None, "drafts from the runner without a draft model"
        for rid, tokens in drafts.items():
            req = requests.get(rid)
            if req is not None and not req.is_finished:
                self.runner_drafts.store(rid, len(req.all_token_ids), tokens)

    def _candidates(
        self, running: list[Request], with_in_flight: bool
    ) -> tuple[list[str], list[list[int]], list[int]]:
        """The decoding generation requests that may still use a draft: (ids, their known tokens, most drafts
        each). A request's tokens in flight count as computed and as produced (`with_in_flight`); without it, a
        request with any is left out."""
        ids: list[str] = []
        tokens: list[list[int]] = []
        caps: list[int] = []
        for req in running:
            num_tokens = len(req.all_token_ids)
            in_flight = req.num_output_placeholders
            if in_flight and not with_in_flight:
                continue
            if (
                req.num_computed_tokens != num_tokens + in_flight - 1
                or req.sampling_params.pooling is not None
            ):
                continue  # prefilling (or resuming after a preemption), or pooling
            cap = (
                min(req.max_tokens - len(req.output_token_ids), self.max_model_len - num_tokens)
                - 1
                - in_flight
            )
            if cap > 0:
                ids.append(req.request_id)
                tokens.append(req.all_token_ids)
                caps.append(cap)
        return ids, tokens, caps

    def on_verified(self, req: Request, num_drafts: int, num_sampled: int) -> None:
        """The runner verified `num_drafts` drafts of `req` and returned `num_sampled` tokens: take back the slots
        of the rejected drafts and count."""
        assert 1 <= num_sampled <= num_drafts + 1, (
            f"{req.request_id}: the runner returned {num_sampled} tokens for {num_drafts} drafts (1..{num_drafts + 1})"
        )
        num_accepted = num_sampled - 1
        req.num_computed_tokens -= num_drafts - num_accepted
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        for i in range(num_accepted):
            per_pos[i] += 1

    def add_stats(self, stats: SchedulerStats) -> None:
        stats.spec_num_drafts = self.num_drafts
        stats.spec_num_draft_tokens = self.num_draft_tokens
        stats.spec_num_accepted_tokens = self.num_accepted_tokens
        stats.spec_num_accepted_tokens_per_pos = list(self.num_accepted_tokens_per_pos)

    def remove(self, request_id: str) -> None:
        """The request left the engine: drop its token mirror."""
        self.proposer.remove(request_id)
