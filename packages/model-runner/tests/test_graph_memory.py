"""CUDA-graph memory: the estimate from a two-size probe (CPU), and on GPU that the probe's estimate is left free
before the KV cache is sized and covers what the real capture takes (decode graphs and piecewise graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

from treadle_model_runner import CacheConfig, ModelConfig
from treadle_model_runner.runner import ModelRunner
from treadle_model_runner.runner.cuda_graph import capture_sizes
from treadle_model_runner.runner.graph_memory import estimate_graph_bytes


def test_estimate_is_the_largest_plus_one_smallest_per_other_size() -> None:
    assert estimate_graph_bytes({256: 100, 1: 3}, 35) == 100 + 34 * 3
    assert estimate_graph_bytes({1: 7}, 1) == 7  # max_num_seqs 1: one size, probed once
    assert estimate_graph_bytes({}, 35) == 0  # the probe's capture failed: nothing reserved
    assert len(capture_sizes(256)) == 35 and capture_sizes(1) == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mixed", [True, False])
def test_graph_memory_is_reserved_before_the_kv_cache(
    tmp_path: Path, mixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode graphs and the mixed graphs (the default on Triton), or the piecewise graphs without them."""
    monkeypatch.setenv("TREADLE_MIXED_GRAPHS", "1" if mixed else "0")
    config = tf.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.2)
    runner = ModelRunner(ModelConfig(str(tmp_path)), cache, 64, 512, "cuda")
    runner.load_model()
    kv = runner.initialize_kv_cache()
    assert runner.graphs is not None and runner.graphs.has(64)
    buckets = [16, 32, 64, 128, 256, 512]
    whole = runner.mixed_graphs.graphs if runner.mixed_graphs is not None else None
    steps = whole if mixed else runner.piecewise
    assert steps is not None and steps.sizes == buckets and (runner.piecewise is None) == mixed
    reserved = runner.graph_bytes_reserved
    taken = runner.graphs.memory_bytes + steps.memory_bytes
    assert reserved > 0 and taken > 0
    assert taken <= 1.2 * reserved + (64 << 20), (taken, reserved)  # the estimate covers the real capture
    # the KV cache left the reserve (and the profiled activations) free under the 0.2 budget
    assert kv.num_blocks * kv.bytes_per_block + reserved <= 0.2 * torch.cuda.mem_get_info()[1]


def test_a_draft_models_graphs_are_estimated_like_the_targets() -> None:
    from types import SimpleNamespace

    from treadle_model_runner.runner.cuda_graph import GraphSizes
    from treadle_model_runner.runner.graph_memory import _draft_bytes, estimate_piecewise_bytes

    def probed(memory: dict[int, int], held: dict[int, int] | None = None) -> GraphSizes:
        graphs = GraphSizes(sorted(memory))
        graphs.memory_by_size = dict(memory)
        graphs.held_bytes_by_size = held or {}  # type: ignore[attr-defined]
        return graphs

    buckets = [16, 32, 64, 128]
    pieces = probed({16: 40, 128: 200}, {16: 10, 128: 80})
    drafter = SimpleNamespace(
        graphs=probed({1: 3, 8: 50}), piecewise=pieces, prefill_graphs=probed({16: 5, 128: 60}),
        pair_graphs=probed({1: 2, 8: 30}),
    )  # fmt: skip
    want = (50 + 4 * 3) + estimate_piecewise_bytes(pieces.memory_by_size, pieces.held_bytes_by_size, buckets)
    assert _draft_bytes(drafter, 5, buckets, 4, 3) == want + (60 + 3 * 5) + (30 + 2 * 2)  # type: ignore[arg-type]
    drafter.piecewise = drafter.prefill_graphs = drafter.pair_graphs = (
        None  # captures that failed: nothing for them
    )
    assert _draft_bytes(drafter, 5, buckets, 4, 3) == 50 + 4 * 3  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_draft_models_and_the_verify_graphs_memory_is_reserved(tmp_path: Path) -> None:
    from treadle_model_runner import SpeculativeConfig
    from treadle_model_runner.runner.draft_model import DraftModel

    config = tf.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    captures: list[str] = []
    capture = DraftModel.capture

    def logged(self: DraftModel, runner: ModelRunner, *args: object, **kwargs: object) -> None:
        kind = str(args[3]) if len(args) > 3 else ""
        captures.append("probe" if "probe" in kind else "real")
        capture(self, runner, *args, **kwargs)  # type: ignore[arg-type]

    DraftModel.capture = logged  # type: ignore[method-assign]
    try:
        spec = SpeculativeConfig(model=str(tmp_path), num_speculative_tokens=3)
        runner = ModelRunner(ModelConfig(str(tmp_path)), CacheConfig(block_size=16, gpu_memory_utilization=0.2),
                             64, 512, "cuda", speculative_config=spec)  # fmt: skip
        runner.load_model()
        runner.initialize_kv_cache()
    finally:
        DraftModel.capture = capture  # type: ignore[method-assign]
    assert captures == [
        "probe",
        "real",
    ]  # the probe captured the draft's graphs before the KV cache was sized
    drafter, verify = runner.drafter, runner.verify_graphs
    assert drafter is not None and drafter.memory_bytes > 0 and verify is not None
    assert drafter.sets.pair_graphs is not None  # the draft's two-token passes (Triton)
    assert runner.mixed_graphs is not None
    sets = [runner.graphs, runner.piecewise, runner.prefill_graphs, verify.graphs, runner.mixed_graphs.graphs]
    taken = sum(g.memory_bytes for g in sets if g is not None) + drafter.memory_bytes
    assert taken <= 1.2 * runner.graph_bytes_reserved + (64 << 20), (taken, runner.graph_bytes_reserved)
