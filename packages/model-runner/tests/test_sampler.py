"""Sampler processing steps against a per-request reference written with plain Python loops.

Each test draws fresh random logits (fixed torch seeds, so a failure reproduces) and compares the batched,
vectorized pipeline with `reference_process`, which handles one request at a time in the order of
ARCHITECTURE §4. Kept sets are compared exactly (which tokens are -inf), kept values to float32 rounding.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.truncation import apply_min_p, apply_top_k_top_p
from treadle_model_runner.sampling_params import SamplingParams

NEG_INF = float("-inf")


def reference_process(
    logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """One request's logits [V] after every processing step, token by token."""
    x = logits.clone()
    vocab = x.shape[0]
    if p.allowed_token_ids is not None:
        allowed = set(p.allowed_token_ids)
        for t in range(vocab):
            if t not in allowed:
                x[t] = NEG_INF
    for word in p.bad_words_token_ids or []:
        prefix = word[:-1]
        if len(prefix) <= len(output) and output[len(output) - len(prefix) :] == prefix:
            x[word[-1]] = NEG_INF
    if len(output) < p.min_tokens:
        for t in p.all_stop_token_ids:
            if t < vocab:
                x[t] = NEG_INF
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c
        x[t] -= p.presence_penalty
    if p.is_greedy:
        return x
    x = x / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(x, dim=0)
        for t in range(vocab):
            if probs[t] < p.min_p * probs.max():
                x[t] = NEG_INF
    if 0 < p.top_k < vocab:
        kth = sorted(x.tolist(), reverse=True)[p.top_k - 1]
        for t in range(vocab):
            if x[t] < kth:
                x[t] = NEG_INF
    if p.top_p < 1.0:
        mass: list[float] = torch.softmax(x.double(), dim=0).tolist()
        mass_before = 0.0
        for t in sorted(range(vocab), key=lambda i: -mass[i]):
            if mass_before >= p.top_p:
                x[t] = NEG_INF
            mass_before += mass[t]
    return x


def random_params(gen: torch.Generator, vocab: int, n: int) -> list[SamplingParams]:
    """n requests covering every option, alone and combined."""

    def r() -> float:
        return float(torch.rand((), generator=gen))

    out = []
    for i in range(n):
        kind = i % 8
        kw: dict = {"temperature": 0.0 if kind == 0 else 0.3 + 1.5 * r()}
        if kind in (1, 7):
            kw["top_k"] = 1 + int(r() * (vocab - 1))
        if kind in (2, 7):
            kw["top_p"] = 0.2 + 0.7 * r()
        if kind in (3, 7):
            kw["min_p"] = 0.05 + 0.3 * r()
        if kind in (4, 0):
            kw.update(
                presence_penalty=2 * r() - 1, frequency_penalty=2 * r() - 1, repetition_penalty=0.5 + r()
            )
        if kind == 5:
            kw["allowed_token_ids"] = sorted({int(r() * vocab) for _ in range(5)})
            kw["logit_bias"] = {int(r() * vocab): 50 * r() - 25 for _ in range(3)}
        if kind == 6:
            kw.update(
                min_tokens=10, all_stop_token_ids={0, vocab - 1, vocab + 5}, bad_words_token_ids=[[3], [1, 2]]
            )
        if i % 3 == 0:
            kw["seed"] = int(r() * 2**40)
        out.append(SamplingParams(**kw))
    return out


def make_batch(seed: int, n: int = 24, vocab: int = 40):
    gen = torch.Generator().manual_seed(seed)
    params = random_params(gen, vocab, n)
    prompts = [
        torch.randint(0, vocab, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]
    outputs = [
        torch.randint(0, vocab, (int(torch.randint(0, 9, (), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]
    for o in outputs[6::8]:
        o.append(1)  # ends with the prefix of bad word [1, 2]
    positions = [len(a) + len(b) for a, b in zip(prompts, outputs, strict=True)]
    logits = torch.randn(n, vocab, generator=gen) * 3
    return params, prompts, outputs, positions, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processed_logits_match_reference(seed: int) -> None:
    params, prompts, outputs, positions, logits = make_batch(seed)
    md = SamplingMetadata.build(params, prompts, outputs, positions, logits.shape[1], "cpu")
    got = Sampler().process_logits(logits.clone(), md)
    for i, p in enumerate(params):
        want = reference_process(logits[i], p, prompts[i], outputs[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i} kept set differs ({p})"
        finite = torch.isfinite(want)
        # (torch.testing.assert_close would import torch.distributed: 5-10 s on the CI machine)
        assert torch.allclose(got[i][finite], want[finite], rtol=1e-5, atol=1e-5), (
            f"row {i}: {got[i]} != {want}"
        )


@pytest.mark.parametrize("seed", [3, 4])
def test_sampled_tokens_respect_processing(seed: int) -> None:
    params, prompts, outputs, positions, logits = make_batch(seed)
    md = SamplingMetadata.build(params, prompts, outputs, positions, logits.shape[1], "cpu")
    refs = torch.stack(
        [reference_process(logits[i], p, prompts[i], outputs[i]) for i, p in enumerate(params)]
    )
    sampler = Sampler()
    for _ in range(30):
        tokens = sampler(logits.clone(), md).sampled_token_ids
        assert tokens.dtype == torch.int64 and tokens.shape == (len(params),)
        chosen = refs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        assert torch.isfinite(chosen).all(), "a masked token was sampled"
        for i, p in enumerate(params):
            if p.is_greedy:
                assert tokens[i] == refs[i].argmax(), f"greedy row {i} is not the argmax"


def test_all_greedy_is_argmax() -> None:
    logits = torch.randn(16, 1000)
    params = [SamplingParams(temperature=t) for t in [0.0, 1e-6, 1e-5] * 5 + [0.0]]
    md = SamplingMetadata.build(params, [[1]] * 16, [[]] * 16, [1] * 16, 1000, "cpu")
    assert md.all_greedy and md.no_penalties and md.no_truncation
    out = Sampler()(logits.clone(), md)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None


def test_min_p_keeps_exactly_tokens_above_threshold() -> None:
    logits = torch.randn(32, 300) * 2
    min_p = torch.rand(32) * 0.5
    got = apply_min_p(logits.clone(), min_p)
    probs = torch.softmax(logits.double(), dim=-1)
    want_kept = probs >= min_p.double().unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    assert torch.equal(torch.isfinite(got), want_kept)
    assert torch.equal(apply_min_p(logits.clone(), torch.zeros(32)), logits)


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.randn(20, 500)
    k = torch.randint(1, 500, (20,))
    k[::4] = 500  # rows without top-k
    got = apply_top_k_top_p(logits.clone(), k, None, max_top_k=int(k[k < 500].max()))
    got_sort = apply_top_k_top_p(logits.clone(), k, torch.ones(20), max_top_k=0)  # the sorting path
    for i in range(20):
        kept = set(torch.topk(logits[i], int(k[i])).indices.tolist())
        assert set(torch.isfinite(got[i]).nonzero().flatten().tolist()) == kept
        assert set(torch.isfinite(got_sort[i]).nonzero().flatten().tolist()) == kept


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.randn(20, 200) * 2
    top_p = torch.rand(20) * 0.9 + 0.05
    got = apply_top_k_top_p(logits.clone(), None, top_p, max_top_k=0)
    probs = torch.softmax(logits.double(), dim=-1)
    for i in range(20):
        order = probs[i].argsort(descending=True)
        mass_before = torch.cumsum(probs[i][order], 0) - probs[i][order]
        want = set(order[mass_before < top_p[i].double()].tolist())
        assert set(torch.isfinite(got[i]).nonzero().flatten().tolist()) == want
        assert probs[i][list(want)].sum() >= top_p[i] - 1e-6


def test_out_of_vocabulary_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"allowed_token_ids of request 0 contains token id 50"):
        SamplingMetadata.build([SamplingParams(allowed_token_ids=[1, 50])], [[1]], [[]], [1], 50, "cpu")
    with pytest.raises(ValueError, match=r"logit_bias .* token id 99, outside the vocabulary \[0, 50\)"):
        SamplingMetadata.build([SamplingParams(logit_bias={99: 1.0})], [[1]], [[]], [1], 50, "cpu")
    with pytest.raises(ValueError, match="one entry per request"):
        SamplingMetadata.build([SamplingParams()], [[1]], [], [1], 50, "cpu")


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.integers(2, 64),
    temperature=st.floats(0.05, 3.0),
    top_k=st.integers(0, 80),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**31),
)
def test_property_sample_is_kept_and_argmax_survives(
    vocab: int, temperature: float, top_k: int, top_p: float, min_p: float, seed: int, data_seed: int
) -> None:
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(data_seed)) * 4
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    params = [p, p.clone(seed=None), p.clone(temperature=0.0)]
    md = SamplingMetadata.build(params, [[0]] * 3, [[]] * 3, [5, 5, 5], vocab, "cpu")
    processed = Sampler().process_logits(logits.clone(), md)
    assert torch.equal(processed.argmax(dim=-1), logits.argmax(dim=-1)), "truncation removed the argmax"
    if 0 < top_k < vocab:
        assert int(torch.isfinite(processed[0]).sum()) <= top_k
    tokens = Sampler()(logits.clone(), md).sampled_token_ids
    assert torch.isfinite(processed.gather(1, tokens.unsqueeze(1))).all()
    assert tokens[2] == logits[2].argmax()
