"""Sampling metadata for draft verification (sample/drafts.py) against SamplingMetadata.build over the expanded rows
written out by hand (each row with its drafts appended to the outputs and its position advanced), field by field
and through the sampler; and the acceptance rule (runner/spec_decode.accepted_runs) against a loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from treadle_model_runner.runner.spec_decode import accepted_runs
from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.drafts import expand_for_drafts
from treadle_model_runner.sampling_params import SamplingParams

VOCAB = 61
STOP = 2


def _params(gen: torch.Generator) -> list[SamplingParams]:
    """Every sampler feature, several rows each, greedy and sampled."""

    def r() -> float:
        return float(torch.rand((), generator=gen))

    return [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, seed=12, top_p=0.8, top_k=9),
        SamplingParams(temperature=1.1, min_p=0.05),
        SamplingParams(temperature=0.0, presence_penalty=r(), frequency_penalty=r(), repetition_penalty=1 + r()),
        SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.4, frequency_penalty=0.5, logprobs=2),
        SamplingParams(temperature=1.0, seed=5, stop_token_ids=[STOP], min_tokens=6, logit_bias={STOP: 2.0, 7: -1.0}),
        SamplingParams(temperature=0.8, bad_words_token_ids=[[4, 5], [9], [1, 2, 3]], allowed_token_ids=list(range(30))),
        SamplingParams(temperature=0.0, logit_bias={11: 3.0}, min_tokens=2, stop_token_ids=[STOP], logprobs=0),
        SamplingParams(temperature=1.0, seed=2**40 + 17),
    ]  # fmt: skip


def _expanded_by_hand(params, prompts, outputs, positions, drafts):  # type: ignore[no-untyped-def]
    rows = [(p, pr, list(out) + list(d[:j]), pos + j)
            for p, pr, out, pos, d in zip(params, prompts, outputs, positions, drafts, strict=True)
            for j in range(len(d) + 1)]  # fmt: skip
    return SamplingMetadata.build(*map(list, zip(*rows, strict=True)), VOCAB, "cpu")


def _flat_pairs(indices: torch.Tensor | None, values: torch.Tensor | None = None) -> dict[int, float]:
    if indices is None:
        return {}
    vals = values.tolist() if values is not None else [1.0] * indices.numel()
    return dict(zip(indices.tolist(), vals, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expanded_metadata_equals_build_over_the_expanded_rows(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = _params(gen)
    n = len(params)
    prompts = [torch.randint(0, VOCAB, (int(torch.randint(1, 9, (), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]  # fmt: skip
    # outputs that end in a bad word's prefix, and drafts that complete or start one
    outputs = [torch.randint(0, VOCAB, (int(torch.randint(0, 8, (), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]  # fmt: skip
    outputs[6] += [1, 2]
    drafts = [torch.randint(0, VOCAB, (int(torch.randint(0, 5, (), generator=gen)),), generator=gen).tolist()
              for _ in range(n)]  # fmt: skip
    drafts[6] = [3, 4, 5, 4]
    drafts[5] = [STOP] * 4
    drafts[0] = []
    positions = [len(p) + len(o) for p, o in zip(prompts, outputs, strict=True)]

    base = SamplingMetadata.build(params, prompts, outputs, positions, VOCAB, "cpu")
    got = expand_for_drafts(base, params, outputs, drafts)
    want = _expanded_by_hand(params, prompts, outputs, positions, drafts)
    for name in ("num_reqs", "all_greedy", "all_random", "max_top_k", "no_penalties", "num_logprobs",
                 "max_num_logprobs"):  # fmt: skip
        assert getattr(got, name) == getattr(want, name), name
    for name in ("temperature", "is_greedy", "top_p", "top_k", "min_p", "seeded_rows", "seed_lo", "seed_hi",
                 "positions", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "output_token_counts", "seen_token_mask", "allowed_mask"):  # fmt: skip
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert _flat_pairs(got.banned_indices) == _flat_pairs(want.banned_indices)
    assert _flat_pairs(got.bias_indices, got.bias_values) == _flat_pairs(want.bias_indices, want.bias_values)

    logits = torch.randn(got.num_reqs, VOCAB, generator=gen) * 2
    a, b = Sampler()(logits.clone(), got), Sampler()(logits.clone(), want)
    seeded = got.seeded_rows
    assert seeded is not None
    is_greedy = torch.tensor(
        [p.is_greedy for p, d in zip(params, drafts, strict=True) for _ in range(len(d) + 1)]
    )
    exact = is_greedy.clone()
    exact[seeded] = True  # greedy and seeded rows are determined; the others draw fresh noise
    assert torch.equal(a.sampled_token_ids[exact], b.sampled_token_ids[exact])
    assert a.logprobs is not None and b.logprobs is not None
    assert torch.equal(a.logprobs.ranks[exact], b.logprobs.ranks[exact])


def test_accepted_runs_keep_drafts_up_to_the_first_mismatch() -> None:
    drafts = [[5, 6, 7], [], [1, 2], [9]]
    tokens = np.array([5, 6, 0, 3, 4, 8, 8, 2, 9, 1])  # rows 0-3 | 4 | 5-7 | 8-9
    first, count = accepted_runs(tokens, drafts)
    assert first.tolist() == [0, 4, 5, 8]
    assert count.tolist() == [3, 1, 1, 2]  # 5 6 then 0; 4; 8 (wrong at once); 9 then bonus 1

    rng = np.random.default_rng(0)
    for _ in range(50):
        drafts = [rng.integers(0, 3, rng.integers(0, 5)).tolist() for _ in range(rng.integers(1, 6))]
        tokens = rng.integers(0, 3, sum(len(d) + 1 for d in drafts))
        first, count = accepted_runs(tokens, drafts)
        start = 0
        for i, d in enumerate(drafts):
            m = next((j for j in range(len(d)) if tokens[start + j] != d[j]), len(d))
            assert (first[i], count[i]) == (start, m + 1)
            start += len(d) + 1
