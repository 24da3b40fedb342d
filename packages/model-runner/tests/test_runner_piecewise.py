"""Piecewise CUDA graphs for prefills and mixed steps (runner/piecewise.py).

CPU: the token buckets and the memory estimate; prefill and mixed steps padded up to a bucket (padding rows with
id 0, position 0, slot -1, as the graphs run them) give the same hidden states and tokens as unpadded steps (torch
backend); the capture's split of a forward at each attention layer. GPU: replayed pieces equal the eager forward (tokens exactly, hidden states to 1e-4 in fp32),
on the Triton backend (FlashInfer's pieces: test_runner_flashinfer.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from test_runner_fakes import FakeScheduler, count_piecewise_replays, make_runner, perturb_, record_hidden

from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams
from treadle_model_runner.runner import ModelRunner
from treadle_model_runner.runner.graph_memory import estimate_piecewise_bytes
from treadle_model_runner.runner.piecewise import _Recorder, bucket_sizes, piecewise_forward

VOCAB = 96


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3: q/k norms make q and k new tensors (not views of qkv) between the pieces."""
    config = tf.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.Qwen3ForCausalLM(config).eval()
    perturb_(hf, seed=3, std=0.15)
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A routed MoE (a dense layer 0, then sparse layers): the fused-MoE kernels inside the pieces."""
    config = tf.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
        eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.Qwen3MoeForCausalLM(config).eval()
    perturb_(hf, seed=4, std=0.15)
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf.save_pretrained(path, safe_serialization=True)
    return path


def test_bucket_sizes() -> None:
    assert bucket_sizes(512) == [16, 32, 64, 128, 256, 512]
    assert bucket_sizes(100) == [16, 32, 64, 100]
    assert bucket_sizes(16) == [16] and bucket_sizes(15) == [] and bucket_sizes(0) == []


def test_memory_estimate_adds_kept_bytes_per_token() -> None:
    # largest 64 took 1000 (keeps 640: 10 per token); smallest 16 took 200 (keeps 160: its pieces take 40)
    got = estimate_piecewise_bytes({64: 1000, 16: 200}, {64: 640, 16: 160}, [16, 32, 64])
    assert got == 1000 + (40 + 160) + (40 + 320)
    assert estimate_piecewise_bytes({}, {}, [16, 32]) == 0  # the probe failed: nothing reserved
    assert estimate_piecewise_bytes({16: 50}, {16: 20}, [16]) == 50


class _PadOnly:
    """Stands in for the runner's PiecewiseGraphs with no bucket captured: steps are padded, then run eagerly."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.padded: list[tuple[int, int]] = []

    def padded_size(self, num_tokens: int) -> int | None:
        size = next((s for s in self.sizes if s >= num_tokens), None)
        self.padded.append((num_tokens, size or num_tokens))
        return size

    def has(self, size: int) -> bool:
        return False


def _run(runner: ModelRunner, prompts: list[list[int]]) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    sched = FakeScheduler(runner)
    hidden = record_hidden(runner)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3, prompt_logprobs=2)]
    for i, p in enumerate(prompts):
        sched.add(f"r{i}", p, params[i % 2], max_tokens=5 + i)
    return sched.run(budget=24), hidden


@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_padded_prefill_steps_equal_unpadded(model: str, request: pytest.FixtureRequest) -> None:
    """Prefill chunks, chunks on cached blocks and mixed steps padded up to a bucket: same tokens, same hidden
    states on the real rows (the padding rows' K/V go nowhere and the backends skip their queries; in the MoE model
    the padding rows are routed like any token and change no real row)."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (9, 30, 5, 14)]
    results = []
    for pad in (False, True):
        runner = make_runner(request.getfixturevalue(model))
        if pad:
            runner.piecewise = _PadOnly([16, 32])  # type: ignore[assignment]
        results.append(_run(runner, prompts))
        if pad:
            padded = runner.piecewise.padded  # type: ignore[union-attr]
            assert any(size > n for n, size in padded), padded  # some step really ran on padding rows
    (tokens, hidden), (padded_tokens, padded_hidden) = results
    assert padded_tokens == tokens
    assert len(padded_hidden) == len(hidden)
    for h, h_pad in zip(hidden, padded_hidden, strict=True):
        torch.testing.assert_close(h_pad, h, atol=1e-5, rtol=1e-5)


def test_capture_splits_the_forward_at_each_attention_layer(qwen3: Path) -> None:
    """The recorder takes every attention call in layer order and hands back an output of q's rows."""
    runner = make_runner(qwen3)
    recorder = _Recorder(pool=None, capturing=False)
    size = 16
    forward = piecewise_forward(runner._require_model(), runner.kv_caches, runner.buffers.input_ids[:size],
                                runner.buffers.positions[:size], recorder)  # fmt: skip
    hidden = forward()
    assert hidden.shape == (size, 64) and torch.isfinite(hidden).all()
    assert [s.layer.layer_idx for s in recorder.splits] == [0, 1, 2]
    for s in recorder.splits:
        assert s.query.shape == (size, 4 * 16) and s.key.shape == (size, 2 * 16) and s.rope is not None
        assert (
            s.output.shape == (size, 4 * 16) and not s.output.any()
        )  # warm-up: zeros stand in for attention
    assert not runner.buffers.input_ids[:size].any() and not runner.buffers.positions[:size].any()


def _gpu_runner(path: Path, backend: str, eager: bool) -> ModelRunner:
    config = ModelConfig(str(path), dtype="float32", attention_backend=backend, enforce_eager=eager)
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=64), 8, 64, "cuda")
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("mixed", [False, True])
def test_piecewise_graphs_equal_eager(
    model: str, mixed: bool, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton in fp32 (FlashInfer takes bf16 only: test_runner_flashinfer.py checks its pieces by logprobs); the
    same steps on the mixed graphs (runner/batch_graphs.py, the default on Triton) instead of the pieces."""
    monkeypatch.setenv("TREADLE_MIXED_GRAPHS", "1" if mixed else "0")
    path = request.getfixturevalue(model)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 40, 17, 3, 60, 11)]
    results: list[Any] = []
    for eager in (True, False):
        runner = _gpu_runner(path, "triton", eager)
        assert (runner.piecewise is None) == (eager or mixed)
        assert (runner.mixed_graphs is None) == (eager or not mixed)
        replays = count_piecewise_replays(runner)
        if runner.mixed_graphs is not None:
            replays = count_piecewise_replays(runner, runner.mixed_graphs.graphs)
        results.append(_run(runner, prompts))
        assert eager or len(set(replays)) >= 2, replays  # prefills and mixed steps went through the pieces
    (tokens, hidden), (graph_tokens, graph_hidden) = results
    assert graph_tokens == tokens
    for h, h_graph in zip(hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h, atol=1e-4, rtol=1e-4)
