"""Draft-model speculative decoding on a GPU (marked gpu), with CUDA graphs on: the target's steps with drafts take
its piecewise graphs, the draft's passes replay the draft's own decode and piecewise graphs.

Triton, float32 (a near tie cannot round two ways): the tokens and logprobs of the run without speculation, for a
smaller draft and for the target as its own draft, whose greedy drafts are then all accepted. FlashInfer (bfloat16
only): the target as its own draft on greedy requests has nearly every draft accepted (the graph and eager paths
may round a near tie differently, so not all), which needs the draft's KV and its graphs' plans right."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from treadle import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3)
SEEDED = SamplingParams(temperature=0.8, seed=5, top_k=50, max_tokens=40, ignore_eos=True)


# heads of 64 elements (FlashInfer's prefill refuses 32 on H200: "Invalid configuration : NUM_MMA_D_QK=2")
def _save(path: Path, seed: int, **shape: Any) -> Path:
    config = tf.LlamaConfig(vocab_size=1001, max_position_embeddings=1024, initializer_range=0.1,
                            tie_word_embeddings=False, **shape)  # fmt: skip
    torch.manual_seed(seed)
    tf.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("target"), 0, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("draft"), 1, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip


def _run(
    path: Path, backend: str, dtype: str, params: list[SamplingParams], **engine: Any
) -> tuple[list, Any]:
    llm = LLM(str(path), dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3,
              attention_backend=backend, **engine)  # fmt: skip
    try:
        runner = llm.client.engine.executor.runner  # type: ignore[attr-defined]
        replays = [0, 0]  # the draft's decode graphs, its two-token graphs
        if runner.drafter is not None:
            sets = runner.drafter.sets
            assert sets.graphs is not None and sets.piecewise is not None
            if (
                backend == "triton"
            ):  # one-request prefill and two-token graphs: Triton's metadata lives on the device
                assert sets.prefill_graphs is not None and sets.pair_graphs is not None
            for i, graphs in enumerate((sets.graphs, sets.pair_graphs)):
                if graphs is not None:
                    graphs.replay = _counting(graphs.replay, replays, i)
        prompts: list[Any] = [{"prompt_token_ids": [(7 * i + 3 * j) % 1000 + 1 for j in range(5 + 23 * i)]}
                              for i in range(12)]  # fmt: skip
        outs = llm.generate(prompts, [params[i % len(params)] for i in range(12)], use_tqdm=False)
        stats = llm.client.get_stats()  # type: ignore[attr-defined]
        assert runner.drafter is None or replays[0] > 0, "the draft's decode graphs never replayed"
        assert runner.drafter is None or backend != "triton" or replays[1] > 0, "no two-token graph replayed"
    finally:
        llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs], stats


def _counting(replay: Any, replays: list[int], i: int) -> Any:
    def counted(size: int) -> torch.Tensor:
        replays[i] += 1
        return replay(size)

    return counted


def test_draft_model_on_gpu_equals_plain_decoding(target: Path, draft: Path) -> None:
    plain, _ = _run(target, "triton", "float32", [GREEDY, SEEDED])
    for path, k in ((draft, 4), (target, 5)):
        spec_config = {"model": str(path), "num_speculative_tokens": k}
        spec, stats = _run(target, "triton", "float32", [GREEDY, SEEDED], speculative_config=spec_config)
        assert stats.spec_num_draft_tokens > 0, stats
        for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
            assert b.token_ids == a.token_ids, (path.name, i)
            for pos_a, pos_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert list(pos_a) == list(pos_b)
                assert [e.logprob for e in pos_b.values()] == pytest.approx(
                    [e.logprob for e in pos_a.values()], abs=1e-3
                )
    _, stats = _run(target, "triton", "float32", [GREEDY],
                    speculative_config={"model": str(target), "num_speculative_tokens": 5})  # fmt: skip
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 100, stats


def test_draft_model_on_flashinfer(target: Path, draft: Path) -> None:
    pytest.importorskip("flashinfer")
    _, stats = _run(target, "flashinfer", "bfloat16", [GREEDY],
                    speculative_config={"model": str(target), "num_speculative_tokens": 5})  # fmt: skip
    assert stats.spec_num_accepted_tokens > 0.9 * stats.spec_num_draft_tokens > 90, stats
    _, stats = _run(target, "flashinfer", "bfloat16", [GREEDY, SEEDED],
                    speculative_config={"model": str(draft), "num_speculative_tokens": 4})  # fmt: skip
    assert stats.spec_num_draft_tokens > 0, stats
