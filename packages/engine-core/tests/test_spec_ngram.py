"""The n-gram proposer against a brute-force reference of vLLM's prompt-lookup rule, on random token sequences
with planted repeats, batched over requests whose tokens grow between calls; and its cost per step."""

from __future__ import annotations

import random
import time

import pytest

from treadle_engine_core.spec_ngram import NgramProposer
from treadle_model_runner.config import SpeculativeConfig


def reference(tokens: list[int], lo: int, hi: int, k: int, max_model_len: int) -> list[int]:
    """The longest n in [lo, hi] whose suffix n-gram starts earlier (at s <= T - 1 - n); the earliest such s;
    the k tokens after it (fewer at the end of the sequence; none past max_model_len)."""
    total = len(tokens)
    k = min(k, max_model_len - total)
    if k <= 0:
        return []
    for n in range(hi, lo - 1, -1):
        if n >= total:
            continue
        suffix = tokens[total - n :]
        for s in range(total - n):
            if tokens[s : s + n] == suffix:
                return tokens[s + n : s + n + k]
    return []


def random_tokens(rng: random.Random, length: int, vocab: int) -> list[int]:
    tokens = [rng.randrange(vocab) for _ in range(length)]
    for _ in range(rng.randrange(4)):  # plant copies of earlier spans, some of them at the end
        n = rng.randint(1, 8)
        if length <= 2 * n:
            continue
        src = rng.randrange(length - n)
        dst = length - n if rng.random() < 0.5 else rng.randrange(length - n)
        tokens[dst : dst + n] = tokens[src : src + n]
    return tokens


@pytest.mark.parametrize("lo,hi,k", [(1, 1, 3), (2, 4, 5), (4, 4, 5), (1, 5, 2), (3, 3, 8)])
def test_proposer_matches_brute_force(lo: int, hi: int, k: int) -> None:
    rng = random.Random(lo * 100 + hi * 10 + k)
    max_model_len = 200
    proposer = NgramProposer(
        SpeculativeConfig(num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi), max_model_len
    )
    live: dict[str, list[int]] = {}
    num_hits = 0
    for step in range(60):
        for _ in range(rng.randrange(3)):  # new requests: short to long, small vocabularies repeat more
            vocab = rng.choice([2, 3, 5, 20, 1000])
            live[f"r{step}-{len(live)}"] = random_tokens(rng, rng.randint(1, 150), vocab)
        for rid in [r for r in live if rng.random() < 0.05]:  # some leave (their rows are reused)
            proposer.remove(rid)
            del live[rid]
        ids = [r for r in live if rng.random() < 0.8]  # a subset of the rows proposes this step
        rng.shuffle(ids)
        caps = [rng.choice([k, k, 1, 0, 100]) for _ in ids]
        got = proposer.propose(ids, [live[r] for r in ids], caps)
        for rid, cap, drafts in zip(ids, caps, got, strict=True):
            want = reference(live[rid], lo, hi, min(k, cap), max_model_len)
            assert drafts == want, f"{rid} ({len(live[rid])} tokens): {drafts} != {want}"
            num_hits += bool(want)
        for rid in live:  # requests grow by 1..k+1 tokens, often by continuing a repeat
            toks = live[rid]
            for _ in range(rng.randint(1, k + 1)):
                if len(toks) < max_model_len - 1:
                    toks.append(toks[rng.randrange(len(toks))] if rng.random() < 0.7 else rng.randrange(50))
    assert num_hits > 20, "the workload should exercise matches"


def test_earliest_occurrence_and_end_of_sequence() -> None:
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2), 100)
    # [7, 8] occurs at 0 and at 4 before the suffix: vLLM takes the earliest (followed by 1, 2, 3)
    assert proposer.propose(["a"], [[7, 8, 1, 2, 7, 8, 5, 6, 7, 8]], [5]) == [[1, 2, 7]]
    # the longest n wins over an earlier shorter match: [3, 7, 8] at 3 beats [7, 8] at 0
    two_three = NgramProposer(
        SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=3), 100
    )
    assert two_three.propose(["b"], [[7, 8, 1, 3, 7, 8, 9, 3, 7, 8]], [5]) == [[9, 3, 7]]
    # overlapping occurrence, fewer tokens than k after it: [5, 5] at 0 is followed by [5, 5]
    assert proposer.propose(["c"], [[5, 5, 5, 5]], [5]) == [[5, 5]]
    # max_model_len caps the drafts (3 tokens of room left)
    small = NgramProposer(SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=1), 8)
    assert small.propose(["d"], [[1, 2, 3, 4, 1]], [5]) == [[2, 3, 4]]


def test_proposer_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """256 decoding requests of 2k tokens: one step's proposal (one new token each) stays in milliseconds."""
    rng = random.Random(0)
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=5, prompt_lookup_max=4), 4096)
    ids = [f"r{i}" for i in range(256)]
    tokens = [random_tokens(rng, 2048, 32000) for _ in ids]
    proposer.propose(ids, tokens, [5] * 256)  # first call mirrors the prompts
    best = float("inf")
    for _ in range(5):
        for toks in tokens:
            toks.append(rng.randrange(32000))
        t0 = time.perf_counter()
        proposer.propose(ids, tokens, [5] * 256)
        best = min(best, time.perf_counter() - t0)
    with capsys.disabled():
        print(f"\nn-gram proposer: 256 requests x 2k tokens, min_n=max_n=4: {best * 1e3:.2f} ms per step")
    assert best < 0.05, f"{best * 1e3:.1f} ms per step"
