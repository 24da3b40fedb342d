"""Penalties against HF transformers (repetition) and the OpenAI formula (presence / frequency), and masks.

Repetition is checked against `transformers.RepetitionPenaltyLogitsProcessor` run on prompt + output ids, row by
row, with different penalties per row in one batch; presence / frequency count only output tokens.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.penalties import build_token_counts
from treadle_model_runner.sampling_params import SamplingParams

VOCAB = 97


def random_tokens(gen: torch.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    lengths = torch.randint(lo, hi, (n,), generator=gen).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in lengths]


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 12
    prompts, outputs = random_tokens(gen, n, 1, 30), random_tokens(gen, n, 0, 20)
    penalties = [0.5 + 1.5 * float(torch.rand((), generator=gen)) for _ in range(n)]
    penalties[3] = 1.0  # a row without penalty rides along unchanged
    params = [SamplingParams(temperature=0.0, repetition_penalty=r) for r in penalties]
    logits = torch.randn(n, VOCAB, generator=gen) * 3
    md = SamplingMetadata.build(params, prompts, outputs, [0] * n, VOCAB, "cpu")
    got = Sampler.apply_penalties_and_masks(logits.clone(), md)
    for i in range(n):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(penalties[i])(ids, logits[i : i + 1].clone())[0]
        assert torch.equal(got[i], want), f"row {i} (penalty {penalties[i]:.3f}) differs from transformers"
    greedy = Sampler()(logits.clone(), md).sampled_token_ids
    assert torch.equal(greedy, got.argmax(dim=-1))


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 10
    prompts, outputs = random_tokens(gen, n, 1, 30), random_tokens(gen, n, 0, 40)
    params = [
        SamplingParams(
            presence_penalty=4 * float(torch.rand((), generator=gen)) - 2,
            frequency_penalty=4 * float(torch.rand((), generator=gen)) - 2,
        )
        for _ in range(n)
    ]
    logits = torch.randn(n, VOCAB, generator=gen)
    md = SamplingMetadata.build(params, prompts, outputs, [0] * n, VOCAB, "cpu")
    got = Sampler.apply_penalties_and_masks(logits.clone(), md)
    for i, p in enumerate(params):
        want = logits[i].clone()
        for t, c in Counter(outputs[i]).items():
            want[t] -= c * p.frequency_penalty + p.presence_penalty
        assert torch.allclose(got[i], want, atol=1e-5), f"row {i}"


def test_token_counts_ignore_out_of_vocabulary_ids() -> None:
    counts, seen = build_token_counts(
        [[1, 1, 5, VOCAB + 3], []], [[2, -1], [7, 7]], VOCAB, torch.device("cpu")
    )
    assert counts.shape == (2, VOCAB) and seen.shape == (2, VOCAB)
    assert counts[0, 1] == 2 and counts[0, 5] == 1 and counts.sum() == 3
    assert seen[0].nonzero().flatten().tolist() == [1, 2, 5]
    assert seen[1].nonzero().flatten().tolist() == [7]
    # numpy rows (a persistent batch's token buffer) give the same counts
    rows = [np.array(r) for r in ([1, 1, 5, VOCAB + 3], [])]
    counts_np, seen_np = build_token_counts(
        rows, [np.array([2, -1]), np.array([7, 7])], VOCAB, torch.device("cpu")
    )
    assert torch.equal(counts_np, counts) and torch.equal(seen_np, seen)


def test_masks_bias_and_min_tokens() -> None:
    params = [
        SamplingParams(allowed_token_ids=[2, 4, 6], logit_bias={4: 100.0, 5: 100.0}),
        SamplingParams(min_tokens=3, all_stop_token_ids={0, 9}, stop_token_ids=[8]),
        SamplingParams(min_tokens=1, all_stop_token_ids={0}),  # already has 2 output tokens: not masked
        SamplingParams(bad_words_token_ids=[[11], [20, 21, 22], [30, 31]]),
    ]
    outputs = [[], [1], [3, 4], [5, 20, 21]]
    md = SamplingMetadata.build(params, [[1]] * 4, outputs, [2] * 4, 40, "cpu")
    got = Sampler.apply_penalties_and_masks(torch.zeros(4, 40), md)
    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [2, 4, 6]
    assert got[0, 4] == 100.0 and got[0, 5] == float("-inf")  # bias never revives a masked token
    assert torch.isinf(got[1]).nonzero().flatten().tolist() == [0, 8, 9]
    assert torch.isfinite(got[2]).all()
    assert torch.isinf(got[3]).nonzero().flatten().tolist() == [11, 22]  # [30, 31]: 30 is not the last output
