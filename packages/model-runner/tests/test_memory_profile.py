"""The memory profile's sampling (runner/profile.py) must cost at least what a real step's sampling can: it builds
every [rows, vocab] tensor the sampler may, and on a GPU its peak is at least that of a heavy mix of requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from treadle_model_runner.runner.profile import profile_sampling_params
from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sampling_params import SamplingParams

VOCAB = 4096


def _runner(max_logprobs: int) -> Any:
    return SimpleNamespace(model_config=SimpleNamespace(max_logprobs=max_logprobs))


def _metadata(params: list[SamplingParams], output_len: int, device: str) -> SamplingMetadata:
    outputs = [[(7 * i + j) % VOCAB for j in range(output_len)] for i in range(len(params))]
    prompts = [[(3 * i + j) % VOCAB for j in range(output_len)] for i in range(len(params))]
    positions = [2 * output_len] * len(params)
    return SamplingMetadata.build(params, prompts, outputs, positions, VOCAB, device)


@pytest.mark.parametrize("max_logprobs", [20, 5, -1])
def test_profile_sampling_builds_every_vocab_sized_tensor(max_logprobs: int) -> None:
    md = _metadata(profile_sampling_params(_runner(max_logprobs), 4), 1, "cpu")
    assert md.output_token_counts is not None and md.seen_token_mask is not None
    assert md.allowed_mask is not None
    assert md.seeded_rows is not None and md.bias_indices is not None and md.banned_indices is not None
    assert not md.all_greedy and not md.all_random  # a mixed batch also takes the greedy argmax
    assert md.top_p is not None and md.top_k is not None and md.min_p is not None
    assert md.max_num_logprobs == (VOCAB if max_logprobs == -1 else max_logprobs)


def _heavy_mix(rows: int) -> list[SamplingParams]:
    """Requests as a busy server sees them: penalties, bias, bad words, seeds, logprobs, greedy and sampled."""
    kinds = [
        SamplingParams(temperature=0.7, repetition_penalty=1.3, logprobs=20, seed=1),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logit_bias={5: 2.0}),
        SamplingParams(temperature=1.2, top_k=40, frequency_penalty=0.5, bad_words_token_ids=[[1, 2]]),
        SamplingParams(temperature=0.9, top_p=0.5, allowed_token_ids=list(range(100)), logprobs=3),
    ]
    return [kinds[i % len(kinds)] for i in range(rows)]


def _peak_bytes(params: list[SamplingParams], output_len: int) -> int:
    md = _metadata(params, output_len, "cuda")
    logits = torch.randn(len(params), VOCAB, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    Sampler()(logits, md)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_sampling_peak_covers_a_heavy_mix() -> None:
    rows = 512
    profiled = _peak_bytes(profile_sampling_params(_runner(20), rows), 1)
    heavy = _peak_bytes(_heavy_mix(rows), 300)
    plain = _peak_bytes([SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * rows, 1)
    assert profiled >= heavy, (profiled, heavy)
    assert profiled > plain  # the old profile's sampling, which the heavy mix can outgrow
