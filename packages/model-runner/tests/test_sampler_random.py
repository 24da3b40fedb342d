"""Randomness of the sampler: seeded determinism across batches, and that Gumbel-max samples softmax.

- A seeded request's token depends only on (its logits, seed, position): the same alone, at any row of a batch of
  16 mixed requests (greedy, seeded, unseeded, with and without truncation and penalties), and whatever the
  unseeded RNG did before.
- Sampled frequencies match softmax(processed logits) within a chi-square bound, for the hashed (seeded) noise and
  for torch's RNG, so the noise really is Exp(1) and the trick is applied the right way round.
- The 32-bit hash arithmetic done in int64 tensors equals a plain-Python uint32 reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.gumbel import derive_keys, fmix32, seeded_uniform
from treadle_model_runner.sampling_params import SamplingParams

VOCAB = 64


def sample(params: list[SamplingParams], logits: torch.Tensor, positions: list[int], **kw) -> torch.Tensor:
    n = len(params)
    outputs = [[1, 2, 3]] * n
    md = SamplingMetadata.build(params, [[5, 6]] * n, outputs, positions, logits.shape[1], "cpu", **kw)
    return Sampler()(logits.clone(), md).sampled_token_ids


def mixed_companions(gen: torch.Generator) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.2, top_k=5),
        SamplingParams(temperature=0.9, top_p=0.7, seed=7),
        SamplingParams(min_p=0.1, seed=123456789),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(logit_bias={3: 10.0}, seed=2**63 + 5),
        SamplingParams(allowed_token_ids=[1, 2, 3, 4]),
        SamplingParams(top_k=3, top_p=0.9, min_p=0.05),
        SamplingParams(seed=-17, temperature=2.0),
        SamplingParams(bad_words_token_ids=[[3, 4]], min_tokens=8, all_stop_token_ids={0}),
        SamplingParams(top_p=0.3),
        SamplingParams(seed=1, top_k=10),
        SamplingParams(temperature=0.5),
    ]


@pytest.mark.parametrize(
    "target",
    [
        SamplingParams(seed=42),
        SamplingParams(seed=0, temperature=0.7, top_k=20, top_p=0.9),
        SamplingParams(seed=2**64 - 1, min_p=0.02, repetition_penalty=1.3, presence_penalty=0.4),
        SamplingParams(seed=-(2**63), temperature=1.5, logit_bias={7: 3.0}),
    ],
)
def test_seeded_request_is_batch_invariant(target: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    companions = mixed_companions(gen)
    alone_tokens, batch_tokens = [], []
    for pos in range(40, 52):
        logits = torch.randn(16, VOCAB, generator=gen)
        row = pos % 16
        others = torch.cat([logits[:row], logits[row + 1 :]])
        alone = sample([target], logits[row : row + 1], [pos])
        batch_params = [*companions[:row], target, *companions[row:]]
        batch_logits = torch.cat([others[:row], logits[row : row + 1], others[row:]])
        torch.manual_seed(pos)  # the unseeded rows' RNG state must not matter
        batch = sample(batch_params, batch_logits, [pos] * 16)
        alone_tokens.append(int(alone[0]))
        batch_tokens.append(int(batch[row]))
    assert alone_tokens == batch_tokens
    assert len(set(alone_tokens)) > 1, "the seeded noise does not change with the position"


def test_seed_and_position_both_matter() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the noise alone
    base = sample([SamplingParams(seed=3)], logits, [10])
    assert torch.equal(base, sample([SamplingParams(seed=3)], logits, [10]))
    others = [int(sample([SamplingParams(seed=3)], logits, [p])[0]) for p in range(11, 31)]
    others += [int(sample([SamplingParams(seed=s)], logits, [10])[0]) for s in range(4, 24)]
    assert others.count(int(base[0])) <= 2
    assert len(set(others)) > 30


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    assert counts[expected == 0].sum() == 0, "sampled a token of probability 0"
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square with <= 7 degrees of freedom: P(X > 40) < 1e-5; every run here is deterministic anyway
CHI2_LIMIT = 40.0
N = 20000


@pytest.mark.parametrize("mode", ["seeds", "positions", "unseeded"])
def test_samples_follow_softmax(mode: str) -> None:
    base = torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]])
    logits = base.expand(N, -1).contiguous()
    if mode == "seeds":
        params = [SamplingParams(seed=s) for s in range(N)]
        positions = [7] * N
    elif mode == "positions":
        params = [SamplingParams(seed=99)] * N
        positions = list(range(N))
    else:
        params = [SamplingParams()] * N
        positions = [7] * N
    gen = torch.Generator().manual_seed(1234)
    tokens = sample(params, logits, positions, generator=gen)
    assert chi_square(tokens, torch.softmax(base[0], 0)) < CHI2_LIMIT


def test_tempered_truncated_samples_follow_renormalized_softmax() -> None:
    base = torch.tensor([[2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0]])
    logits = base.expand(N, -1).contiguous()
    params = [SamplingParams(seed=s, temperature=0.6, top_k=5, top_p=0.9) for s in range(N)]
    tokens = sample(params, logits, [3] * N)
    scaled = base[0] / 0.6
    scaled[5:] = float("-inf")  # top-5
    probs = torch.softmax(scaled, 0)  # [.58, .25, .11, .03, .02]: mass before token 3 is .945 >= .9
    assert probs[:2].sum() < 0.9 <= probs[:3].sum()
    scaled[3:] = float("-inf")  # top-p keeps tokens 0, 1, 2
    assert chi_square(tokens, torch.softmax(scaled, 0)) < CHI2_LIMIT


def test_seeded_uniform_looks_uniform_and_independent() -> None:
    rows = 64
    u = seeded_uniform(
        torch.arange(rows, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.int64),
        torch.full((rows,), 5),
        4096,
    ).double()
    assert ((u > 0) & (u < 1)).all()
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    flat = u.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]  # neighbouring tokens
    assert abs(float(corr)) < 0.01
    corr_rows = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]  # neighbouring seeds
    assert abs(float(corr_rows)) < 0.01


def fmix32_reference(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_fmix32_matches_uint32_reference(values: list[int]) -> None:
    got = fmix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [fmix32_reference(v) for v in values]


def test_keys_depend_on_every_word() -> None:
    zeros = torch.zeros(1, dtype=torch.int64)
    base = derive_keys(zeros, zeros, zeros)
    for changed in [(zeros + 1, zeros, zeros), (zeros, zeros + 1, zeros), (zeros, zeros, zeros + 1)]:
        k0, k1 = derive_keys(*changed)
        assert k0 != base[0] and k1 != base[1]
    _, k1 = derive_keys(zeros, zeros, zeros + (1 << 32))  # the high word of the position counts too
    assert k1 != base[1]
