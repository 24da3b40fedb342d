"""Drafts the model runner proposes (speculative_config method draft_model), kept for the next schedule.

The runner's draft model drafts after each step, for each request that sampled (runner/draft_model.py), and the
step's ModelRunnerOutput carries them (`draft_token_ids`). They follow the request's tokens as the runner saw
them, so each is stored with that count and offered only while the request still has exactly that many tokens:
a request that ended, was preempted (its next step re-prefills) or is still waiting for its tokens gets none.
Same interface as the n-gram proposer (spec_ngram.py), so SpecDecoding treats both alike.
"""

from __future__ import annotations

from collections.abc import Sequence


class RunnerDrafts:
    def __init__(self, num_speculative_tokens: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        # request id -> (its token count, drafts after them)
        self.drafts: dict[str, tuple[int, list[int]]] = {}

    def store(self, request_id: str, num_tokens: int, drafts: list[int]) -> None:
        """The runner drafted `drafts` after the request's first `num_tokens` tokens."""
        if drafts:
            self.drafts[request_id] = (num_tokens, drafts)
        else:
            self.drafts.pop(request_id, None)

    def remove(self, request_id: str) -> None:
        """Forget a request that left the engine (or whose drafts no longer follow its tokens)."""
        self.drafts.pop(request_id, None)

    def propose(
        self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]], max_drafts: Sequence[int]
    ) -> list[list[int]]:
        """Each request's stored drafts, at most min(num_speculative_tokens, max_drafts[i]) of them; none when
        they were drafted after another token count than it has now."""
        out: list[list[int]] = []
        k = self.num_speculative_tokens
        for rid, tokens, cap in zip(request_ids, token_ids, max_drafts, strict=True):
            stored = self.drafts.get(rid)
            if stored is None or stored[0] != len(tokens):
                out.append([])
                continue
            out.append(stored[1][: min(k, cap)])
        return out

    def would_draft(
        self, request_ids: Sequence[str], token_ids: Sequence[Sequence[int]], max_drafts: Sequence[int]
    ) -> bool:
        """Whether any of them will have drafts: yes, the runner drafts for each after the step in flight."""
        return bool(request_ids)
