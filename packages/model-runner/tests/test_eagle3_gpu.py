"""EAGLE-3 on a GPU (marked gpu): the tokens of the run without speculation, with enforce_eager and without it
(then the target replays its CUDA graphs, which write the hidden states the head reads into a persistent buffer,
and the head's drafting passes replay its own decode graphs). Triton attention, float32 (a near tie cannot round
two ways), a random head (drafts mostly rejected); and the same drafts with graphs as without, which needs the
graphs' hidden states right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _count_replays(graphs: Any) -> list[int]:
    """[replays of `graphs` from now on] (none when None)."""
    replays = [0]
    if graphs is not None:
        replay = graphs.replay

        def counted(size: int) -> torch.Tensor:
            replays[0] += 1
            return replay(size)

        graphs.replay = counted
    return replays


def test_eagle3_on_gpu_equals_plain_decoding(models: tuple[Path, Path]) -> None:
    target, head = models
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 40, 130, 9, 77, 3)]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=7, top_k=50)] * 3
    options = {
        "device": "cuda",
        "attention_backend": "triton",
        "max_num_batched_tokens": 64,
        "block_size": 16,
    }
    plain = serve(make_runner(target, **options), prompts, params, 30, budget=64)
    spec = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=4)
    served = {}
    for enforce_eager in (True, False):
        runner = make_runner(target, speculative_config=spec, enforce_eager=enforce_eager, **options)
        # the target keeps its graphs (they write its hidden states into the head's buffer too), the head has its
        # own (its hidden-state input a buffer too)
        assert (runner.graphs is None) == enforce_eager
        sets = runner.drafter.sets
        assert (sets.graphs is None) == enforce_eager and sets.pair_graphs is None
        replays = _count_replays(sets.graphs)
        served[enforce_eager] = serve(runner, prompts, params, 30, budget=64)
        assert enforce_eager or replays[0] > 0, "the head's decode graphs never replayed"
        assert served[enforce_eager].outputs == plain.outputs, enforce_eager
        assert served[enforce_eager].num_draft_tokens > 100, served[enforce_eager]
    # the graphs' hidden states are the eager forward's: the same drafts (a near tie may round apart)
    eager, graphs = served[True].proposals, served[False].proposals
    same = sum(a == b for a, b in zip(eager, graphs, strict=False))
    assert same >= 0.95 * max(len(eager), len(graphs)), (same, len(eager), len(graphs))
