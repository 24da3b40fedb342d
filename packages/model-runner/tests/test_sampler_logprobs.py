"""Logprobs of sampled tokens and prompt tokens: values, top-k, 1-based rank, and the host conversion."""

from __future__ import annotations

import pytest
import torch

from treadle_model_runner.outputs import Logprobs
from treadle_model_runner.sample import Sampler, SamplingMetadata, compute_prompt_logprobs, token_logprobs
from treadle_model_runner.sampling_params import SamplingParams


def reference_logprobs(logits_row: torch.Tensor, token: int, k: int) -> Logprobs:
    lp = torch.log_softmax(logits_row.double(), dim=0)
    order = sorted(range(lp.numel()), key=lambda t: -float(lp[t]))
    rank = 1 + sum(1 for t in range(lp.numel()) if lp[t] > lp[token])  # no ties in random logits
    ids = [token, *order[:k]]
    return Logprobs(ids, [float(lp[t]) for t in ids], rank)


def assert_logprobs_equal(got: Logprobs | None, want: Logprobs) -> None:
    assert got is not None
    assert got.token_ids == want.token_ids
    assert got.chosen_rank == want.chosen_rank
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_sampled_logprobs_and_ranks(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 300
    params = [
        SamplingParams(logprobs=5, temperature=0.0, repetition_penalty=1.4),
        SamplingParams(logprobs=0, seed=1, temperature=0.7, top_k=30),
        SamplingParams(),  # no logprobs
        SamplingParams(logprobs=20, seed=2, top_p=0.8, logit_bias={3: 4.0}),
        SamplingParams(logprobs=3, temperature=1.3, min_p=0.05, seed=5),
    ]
    n = len(params)
    prompts, outputs = [[1, 2, 3]] * n, [[4, 5]] * n
    md = SamplingMetadata.build(params, prompts, outputs, [5] * n, vocab, "cpu")
    assert md.max_num_logprobs == 20 and md.num_logprobs == [5, 0, -1, 20, 3]
    logits = torch.randn(n, vocab, generator=gen) * 2
    sampler = Sampler(logprobs_mode=mode)  # type: ignore[arg-type]
    out = sampler(logits.clone(), md)
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (n, 21)
    source = logits if mode == "raw_logprobs" else sampler.process_logits(logits.clone(), md)
    got = out.logprobs.tolists(md.num_logprobs)
    assert got[2] is None
    for i in (0, 1, 3, 4):
        token = int(out.sampled_token_ids[i])
        want = reference_logprobs(source[i], token, md.num_logprobs[i])
        if mode == "processed_logprobs":  # truncated tokens tie at -inf: compare only the finite top entries
            lp = got[i]
            assert lp is not None and lp.token_ids[0] == token and lp.chosen_rank == want.chosen_rank
            finite = [j for j, v in enumerate(want.logprobs) if v != float("-inf")]
            assert [lp.logprobs[j] for j in finite] == pytest.approx(
                [want.logprobs[j] for j in finite], abs=1e-5
            )
            assert [lp.token_ids[j] for j in finite] == [want.token_ids[j] for j in finite]
        else:
            assert_logprobs_equal(got[i], want)
    if mode == "processed_logprobs":
        assert got[0] is not None and got[0].chosen_rank == 1  # greedy: the argmax of what it was drawn from
        assert got[3] is not None and float(torch.tensor(got[3].logprobs[1:]).exp().sum()) <= 1.0 + 1e-5


def test_no_logprobs_requested_gives_none() -> None:
    md = SamplingMetadata.build([SamplingParams(seed=1)], [[1]], [[]], [1], 10, "cpu")
    assert Sampler()(torch.randn(1, 10), md).logprobs is None


def test_rank_counts_ties_against_the_chosen_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    t = token_logprobs(logits, torch.tensor([2]), num_top=2)
    assert t.ranks.tolist() == [2]  # tokens 1 and 2 tie for first: rank = count of logits >= chosen
    assert token_logprobs(logits, torch.tensor([3]), num_top=0).ranks.tolist() == [4]
    with pytest.raises(ValueError, match=r"num_top \(-1\) must be >= 0"):
        token_logprobs(logits, torch.tensor([0]), num_top=-1)
    full = token_logprobs(logits, torch.tensor([2]), num_top=21)  # more than V: the whole row, once each
    assert (
        full.num_top == 4
        and full.ranks.tolist() == [2]
        and sorted(full.token_ids[0, 1:].tolist()) == [0, 1, 2, 3]
    )


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_whole_vocabulary_logprobs(mode: str) -> None:
    """logprobs = -1: every token of the vocabulary once, its value the log-softmax of the logits logprobs describe
    (raw, or processed: penalties, temperature, truncation), sorted largest first, beside the chosen token and its
    rank; rows asking for fewer keep their top-k."""
    gen = torch.Generator().manual_seed(3)
    vocab = 257
    params = [
        SamplingParams(logprobs=-1, temperature=0.0),
        SamplingParams(logprobs=-1, seed=4, temperature=0.8, top_k=40, repetition_penalty=1.3),
        SamplingParams(logprobs=2, seed=5, top_p=0.9),
        SamplingParams(seed=6),
    ]
    n = len(params)
    md = SamplingMetadata.build(params, [[1, 2, 3]] * n, [[4, 5]] * n, [5] * n, vocab, "cpu")
    assert md.num_logprobs == [vocab, vocab, 2, -1] and md.max_num_logprobs == vocab
    logits = torch.randn(n, vocab, generator=gen) * 3
    sampler = Sampler(logprobs_mode=mode)  # type: ignore[arg-type]
    out = sampler(logits.clone(), md)
    source = logits if mode == "raw_logprobs" else sampler.process_logits(logits.clone(), md)
    want_lp = torch.log_softmax(source.double(), dim=-1)
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (n, vocab + 1)
    got = out.logprobs.tolists(md.num_logprobs)
    for i in (0, 1):
        lp, token = got[i], int(out.sampled_token_ids[i])
        assert lp is not None and len(lp.token_ids) == vocab + 1 and lp.token_ids[0] == token
        assert sorted(lp.token_ids[1:]) == list(range(vocab))  # each token once
        assert lp.logprobs[1:] == sorted(lp.logprobs[1:], reverse=True)
        assert lp.logprobs == pytest.approx([float(want_lp[i, t]) for t in lp.token_ids], abs=1e-5)
        assert lp.chosen_rank == int((source[i] >= source[i, token]).sum())
    assert got[2] is not None and len(got[2].token_ids) == 3 and got[3] is None


def test_whole_vocabulary_prompt_logprobs() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 60, generator=gen) * 3
    next_tokens = torch.randint(0, 60, (5,), generator=gen)
    got = compute_prompt_logprobs(logits.clone(), next_tokens, -1)
    for i in range(5):
        assert_logprobs_equal(got[i], reference_logprobs(logits[i], int(next_tokens[i]), 60))


@pytest.mark.parametrize("num_logprobs", [0, 4])
def test_prompt_logprobs(num_logprobs: int) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 50, generator=gen) * 3
    next_tokens = torch.randint(0, 50, (7,), generator=gen)
    got = compute_prompt_logprobs(logits.clone(), next_tokens, num_logprobs)
    assert len(got) == 7
    for i in range(7):
        assert_logprobs_equal(got[i], reference_logprobs(logits[i], int(next_tokens[i]), num_logprobs))
    with pytest.raises(ValueError, match="one next token per position"):
        compute_prompt_logprobs(logits, next_tokens[:3], 1)


def test_logprobs_fields_and_their_limit() -> None:
    """-1 asks for the whole vocabulary; the engine's max_logprobs (-1: no limit) caps both fields in vLLM's words;
    stop strings need the detokenized text."""
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(
            ValueError, match=rf"^{field} must be non-negative or -1 \(the whole vocabulary\)"
        ):
            SamplingParams(**{field: -2})  # type: ignore[arg-type]
    SamplingParams(logprobs=0).check_logprobs_limit(0, 100)  # 0 and None always pass, as in vLLM
    SamplingParams(logprobs=-1, prompt_logprobs=-1).check_logprobs_limit(-1, 100)
    SamplingParams(logprobs=-1).check_logprobs_limit(100, 100)
    too_many = "Requested {} logprobs of {}, which is greater than max allowed: {}"
    for params, limit, words in (
        (SamplingParams(logprobs=21), 20, too_many.format("sample", 21, 20)),
        (SamplingParams(logprobs=-1), 20, too_many.format("sample", 100, 20)),
        (SamplingParams(prompt_logprobs=-1), 20, too_many.format("prompt", 100, 20)),
        (SamplingParams(logprobs=101), -1, too_many.format("sample", 101, 100)),
    ):
        with pytest.raises(ValueError, match=f"^{words}.*--max-logprobs"):
            params.check_logprobs_limit(limit, 100)
    assert SamplingParams().detokenize and not SamplingParams(detokenize=False).detokenize
    with pytest.raises(ValueError, match=r"^stop strings are only supported when detokenize is True\."):
        SamplingParams(stop=["x"], detokenize=False)
