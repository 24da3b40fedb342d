"""Sampler on CUDA: same seeded tokens as on CPU, and no host synchronization inside Sampler.__call__."""

from __future__ import annotations

import pytest
import torch

from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.gumbel import seeded_uniform
from treadle_model_runner.sample.gumbel_triton import seeded_noise_triton
from treadle_model_runner.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 32000


def batch(n: int) -> list[SamplingParams]:
    kinds = [
        SamplingParams(seed=11, top_k=50, top_p=0.9, logprobs=5),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(seed=2**63 + 1, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.2),
        SamplingParams(top_p=0.8, logit_bias={5: 3.0}),
        SamplingParams(seed=-3, temperature=0.7, allowed_token_ids=list(range(100, 400))),
        SamplingParams(
            temperature=1.1, bad_words_token_ids=[[7], [8, 9]], min_tokens=4, all_stop_token_ids={2}
        ),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def build(params: list[SamplingParams], device: str) -> SamplingMetadata:
    n = len(params)
    prompts = [[(7 * i + j) % VOCAB for j in range(50)] for i in range(n)]
    outputs = [[(13 * i + j) % VOCAB for j in range(i % 7)] + [8] for i in range(n)]
    positions = [len(a) + len(b) for a, b in zip(prompts, outputs, strict=True)]
    return SamplingMetadata.build(params, prompts, outputs, positions, VOCAB, device)


def test_seeded_uniform_bits_equal_cpu() -> None:
    lo = torch.tensor([0, 1, 2**32 - 1, 12345], dtype=torch.int64)
    hi = torch.tensor([0, 7, 2**32 - 1, 0], dtype=torch.int64)
    pos = torch.tensor([0, 5, 2**40, 77], dtype=torch.int64)
    cpu = seeded_uniform(lo, hi, pos, VOCAB)
    gpu = seeded_uniform(lo.cuda(), hi.cuda(), pos.cuda(), VOCAB).cpu()
    assert torch.equal(cpu, gpu)
    # the fused Triton kernel writes the same bits into the chosen rows, and E = -log U
    rows = torch.tensor([5, 0, 3, 1], device="cuda")
    out = torch.zeros(6, VOCAB, device="cuda")
    seeded_noise_triton(out, rows, lo.cuda(), hi.cuda(), pos.cuda(), write_uniform=True)
    assert torch.equal(out[rows].cpu(), cpu)
    assert (out[[2, 4]] == 0).all()
    seeded_noise_triton(out, rows, lo.cuda(), hi.cuda(), pos.cuda())
    assert torch.allclose(out[rows].cpu(), -torch.log(cpu), rtol=1e-5, atol=1e-6)


def test_seeded_and_greedy_tokens_equal_cpu() -> None:
    params = batch(24)
    logits = torch.randn(24, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    cpu = Sampler()(logits.clone(), build(params, "cpu")).sampled_token_ids
    gpu = Sampler()(logits.cuda(), build(params, "cuda")).sampled_token_ids.cpu()
    deterministic = [i for i, p in enumerate(params) if p.seed is not None or p.is_greedy]
    assert torch.equal(cpu[deterministic], gpu[deterministic])


def test_sampler_does_not_sync() -> None:
    params = batch(64)
    md = build(params, "cuda")
    logits = torch.randn(64, VOCAB, device="cuda")
    sampler = Sampler()
    sampler(logits.clone(), md)  # warm-up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits.clone(), md)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.sampled_token_ids.device.type == "cuda"
