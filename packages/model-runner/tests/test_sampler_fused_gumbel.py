"""The fused Gumbel path (TREADLE_FUSED_GUMBEL=1): its per-row keys on CPU; on CUDA (``-m gpu``) the same tokens
as the torch path for seeded rows, and the path taken only for batches that only sample."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from treadle_model_runner.sample import Sampler, SamplingMetadata
from treadle_model_runner.sample.gumbel import derive_keys, gumbel_keys
from treadle_model_runner.sampling_params import SamplingParams

VOCAB = 32000


def _metadata(params: list[SamplingParams], device: str) -> SamplingMetadata:
    n = len(params)
    prompts = [[(7 * i + j) % VOCAB for j in range(20)] for i in range(n)]
    outputs = [[(13 * i + j) % VOCAB for j in range(i % 5)] for i in range(n)]
    positions = [len(a) + len(b) for a, b in zip(prompts, outputs, strict=True)]
    return SamplingMetadata.build(params, prompts, outputs, positions, VOCAB, device)


def test_keys_seeded_rows_derived_others_random() -> None:
    params = [SamplingParams(seed=5), SamplingParams(), SamplingParams(seed=2**63 + 9, temperature=0.5)] * 3
    md = _metadata(params, "cpu")
    assert md.seeded_rows is not None and md.seed_lo is not None and md.seed_hi is not None
    assert md.positions is not None
    keys = gumbel_keys(
        dataclasses.replace(md, generator=torch.Generator().manual_seed(1)), torch.device("cpu")
    )
    k0, k1 = derive_keys(md.seed_lo, md.seed_hi, md.positions)
    assert torch.equal(keys[md.seeded_rows], torch.stack([k0, k1], dim=1))
    assert ((keys >= 0) & (keys < 2**32)).all()
    again = gumbel_keys(
        dataclasses.replace(md, generator=torch.Generator().manual_seed(2)), torch.device("cpu")
    )
    unseeded = [1, 4, 7]
    assert torch.equal(again[md.seeded_rows], keys[md.seeded_rows])
    assert not torch.equal(again[unseeded], keys[unseeded]), "unseeded rows draw from the generator"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_seeded_tokens_equal_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [SamplingParams(seed=i, temperature=0.4 + 0.1 * (i % 8)) for i in range(64)]
    md = _metadata(params, "cuda")
    logits = (
        (torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16).cuda()
    )
    monkeypatch.setenv("TREADLE_FUSED_GUMBEL", "0")
    torch_path = Sampler()(logits.clone(), md).sampled_token_ids
    monkeypatch.setenv("TREADLE_FUSED_GUMBEL", "1")
    fused = Sampler()(logits.clone(), md).sampled_token_ids
    assert fused.tolist() == torch_path.tolist()
    with_logprobs = _metadata([SamplingParams(seed=1, logprobs=2)] * 4, "cuda")
    out = Sampler()(logits[:4].clone(), with_logprobs)
    assert out.logprobs is not None, "a batch asking for logprobs keeps the full path"
