"""EAGLE-3 on a GPU (marked gpu): the tokens of the run without speculation, with enforce_eager and without it
(EAGLE-3 captures no CUDA graph either way: the head reads the target's hidden states, which a replayed graph does
not hand over; the run without speculation keeps its graphs). Triton attention, float32 (a near tie cannot round
two ways); a random head (drafts mostly rejected) and the target's pass-0 features checked by its first draft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eagle3_fixtures import head_config, random_head, save_head, serve
from test_runner_fakes import make_runner, save_llama

from treadle_model_runner import SamplingParams, SpeculativeConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

VOCAB = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eagle3_gpu")
    target = save_llama(root / "target", 4, vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024)  # fmt: skip
    config = head_config(VOCAB, VOCAB // 2, hidden_size=256, intermediate_size=384)
    return target, save_head(root / "head", config, random_head(config, 256, seed=2))


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_eagle3_on_gpu_equals_plain_decoding(models: tuple[Path, Path], enforce_eager: bool) -> None:
    target, head = models
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 40, 130, 9, 77, 3)]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=7, top_k=50)] * 3
    options = {"device": "cuda", "attention_backend": "triton", "enforce_eager": enforce_eager,
               "max_num_batched_tokens": 64, "block_size": 16}  # fmt: skip
    plain = serve(make_runner(target, **options), prompts, params, 30, budget=64)
    spec = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=4)
    runner = make_runner(target, speculative_config=spec, **options)
    assert runner.graphs is None and runner.describe()["cuda_graphs"].startswith("off")
    served = serve(runner, prompts, params, 30, budget=64)
    assert served.outputs == plain.outputs
    assert served.num_draft_tokens > 100, served
