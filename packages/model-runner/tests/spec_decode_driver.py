"""Test helpers (no tests here): run a request without drafts for its reference tokens, then again feeding it
draft tokens taken from that reference, some of them wrong, and check each step against the contract of
scheduler_output.py: a step keeps the drafts up to the first wrong one, plus the sample at that position, which
for greedy and seeded requests is the reference's token there."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_runner_fakes import FakeScheduler

from treadle_model_runner import Logprobs, ModelRunnerOutput, SamplingParams

# per speculative step, cycled: (number of drafts, index of the first wrong draft or None when all are right)
PATTERN = [(3, None), (2, 0), (4, 2), (1, None), (4, 3), (2, 1), (4, None), (3, 0), (5, 4)]


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]  # the run without drafts
    logprobs: list[Logprobs | None]  # per token (None: not asked)


@dataclass
class SpecRun:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Logprobs | None] = field(default_factory=list)
    num_kept: int = 0  # drafts kept over the run
    num_refused: int = 0  # steps that stopped at a wrong draft


def _take(out: ModelRunnerOutput, req_id: str) -> tuple[list[int], list[Logprobs | None]]:
    i = out.req_id_to_index[req_id]
    tokens = out.sampled_token_ids[i]
    lps = out.logprobs[i] if out.logprobs else None
    return tokens, (list(lps) if lps is not None else [None] * len(tokens))


def reference(
    sched: FakeScheduler,
    req_id: str,
    prompt: list[int],
    params: SamplingParams,
    n: int,
    lora_request: Any = None,
) -> Reference:
    """`n` tokens of `req_id`, one decode step each (after one prefill step)."""
    sched.add(req_id, prompt, params, max_tokens=n, lora_request=lora_request)
    ref = Reference(list(prompt), [], [])
    out = sched.step({req_id: len(prompt)})
    while True:
        tokens, lps = _take(out, req_id)
        ref.tokens += tokens
        ref.logprobs += lps
        if req_id not in sched.requests:
            return ref
        out = sched.step({req_id: 1})


def wrong_draft(right: int, vocab_size: int, j: int) -> int:
    return (right + 1 + j) % vocab_size


def drafts_for(
    ref: Reference, done: int, k: int, wrong: int | None, vocab_size: int
) -> tuple[list[int], int]:
    """(drafts after `done` outputs, how many of them the runner must keep): the reference's next k tokens, the
    one at index `wrong` changed."""
    drafts = ref.tokens[done : done + k]
    keep = len(drafts)
    if wrong is not None and wrong < len(drafts):
        drafts[wrong] = wrong_draft(drafts[wrong], vocab_size, wrong)
        keep = wrong
    return drafts, keep


def speculate(
    sched: FakeScheduler,
    req_id: str,
    ref: Reference,
    params: SamplingParams,
    vocab_size: int,
    others: Callable[[], dict[str, int]] | None = None,
    tol: float = 1e-5,
    lora_request: Any = None,
) -> SpecRun:
    """Run `req_id` (the reference's prompt and params) with drafts from PATTERN, asserting each step's tokens and
    logprobs (within `tol`) against the reference. `others()`: the other requests to schedule alongside, each step."""
    n = len(ref.tokens)
    sched.add(req_id, ref.prompt, params, max_tokens=n, lora_request=lora_request)
    run = SpecRun()
    alongside = others or dict
    tokens, lps = _take(sched.step({req_id: len(ref.prompt), **alongside()}), req_id)
    assert tokens == ref.tokens[:1]
    run.tokens, run.logprobs = tokens, lps
    for k, wrong in itertools.cycle(PATTERN):
        done = len(run.tokens)
        if done >= n:
            break
        drafts, keep = drafts_for(ref, done, min(k, n - done - 1), wrong, vocab_size)
        plan = {req_id: 1 + len(drafts), **alongside()}
        tokens, lps = _take(sched.step(plan, {req_id: drafts}), req_id)
        assert tokens == ref.tokens[done : done + keep + 1], f"after {done} tokens, drafts {drafts}"
        check_logprobs(lps, ref.logprobs[done : done + keep + 1], tol)
        run.tokens += tokens
        run.logprobs += lps
        run.num_kept += keep
        run.num_refused += keep < len(drafts)
    assert run.tokens == ref.tokens
    return run


def check_logprobs(got: list[Logprobs | None], want: list[Logprobs | None], tol: float = 1e-5) -> None:
    """Each token's logprobs as the run without drafts gave them: same tokens and ranks, values within `tol`."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g is not None
        assert g.token_ids == w.token_ids and g.chosen_rank == w.chosen_rank
        assert g.logprobs == pytest.approx(w.logprobs, abs=tol)
