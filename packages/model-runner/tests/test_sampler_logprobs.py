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
    with pytest.raises(ValueError, match=r"num_top \(21\) must be in \[0, 20\]"):
        token_logprobs(logits, torch.tensor([0]), num_top=21)


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
