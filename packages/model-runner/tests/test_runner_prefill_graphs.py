"""Full CUDA graphs for steps that prefill one request (runner/prefill_graphs.py).

What they rely on: launches captured for one request of B query tokens, replayed on the step buffers holding a
real request of T <= B tokens (its prompt, a chunk on top of cached blocks, or the tail the prefix cache left),
compute what the step's own launches compute. CPU: Triton's interpreter runs the capture-time forward (built
once per bucket before any request, as the capture builds it) on each one-request step instead of the step's
own forward, against the torch backend: the same greedy tokens, prompt logprobs and hidden states. GPU
(``-m gpu``): the replayed graphs against the eager runner on the Triton backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from test_runner_fakes import FakeScheduler, perturb_, record_hidden, run_interpreted

from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams
from treadle_model_runner.runner import ModelRunner

pytest.importorskip("triton")
VOCAB = 128


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(config).eval()
    perturb_(hf, seed=5, std=0.15)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path, safe_serialization=True)
    return path


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (30, 5, 3, 13, 60)]


def _run(runner: ModelRunner, budget: int) -> tuple[dict[str, list[int]], list[torch.Tensor], list[Any]]:
    """The prompts one request at a time (every step holds one request); prompt logprobs on three of them."""
    sched = FakeScheduler(runner, seed=1)
    hidden = record_hidden(runner)
    for i, p in enumerate(_prompts()):
        sched.add(f"r{i}", p, SamplingParams(temperature=0.0, prompt_logprobs=2 if i % 2 == 0 else None), 4)
    tokens = sched.run(budget=budget, max_seqs=1)
    prompt_logprobs = [
        (req_id, [p.token_ids for p in positions], [p.logprobs for p in positions])
        for o in sched.outputs
        for req_id, positions in o.prompt_logprobs.items()
    ]
    assert len(prompt_logprobs) >= 4  # the 30- and 60-token prompts' chunks, the 3-token prompt
    return tokens, hidden, prompt_logprobs


def assert_same_prompt_logprobs(got: list[Any], want: list[Any]) -> None:
    assert [(r, ids) for r, ids, _ in got] == [(r, ids) for r, ids, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)


SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from test_runner_fakes import make_runner
    from test_runner_prefill_graphs import _run, assert_same_prompt_logprobs
    from treadle_model_runner.runner.graphs import prepare_prefill_capture

    class CaptureTimeForwards:
        \"\"\"Stands in for the prefill graphs: each bucket's forward built before any request (as the capture
        builds it), run on the step buffers the real step filled (as a replay runs the graph).\"\"\"

        def __init__(self, runner, sizes):
            self.sizes = sizes
            self.forwards = {s: prepare_prefill_capture(runner, s) for s in sizes}
            self.replays = []

        def padded_size(self, n):
            return next((s for s in self.sizes if s >= n), None)

        def has(self, size):
            return size in self.forwards

        def replay(self, size):
            self.replays.append(size)
            return self.forwards[size]()

    path = sys.argv[1]
    results = {}
    for backend in ("torch", "triton"):
        runner = make_runner(path, attention_backend=backend, block_size=4)
        if backend == "triton":
            assert runner.attn_backend.supports_prefill_graphs
            runner.prefill_graphs = CaptureTimeForwards(runner, [4, 8, 16, 32])
        results[backend] = _run(runner, budget=24)
    (ref_tokens, ref_hidden, ref_lp), (tokens, hidden, lp) = results["torch"], results["triton"]
    replays = runner.prefill_graphs.replays
    # 30 tokens: a chunk of 24 (more query tokens than one program's tile holds), then 6 on top of them;
    # 60 tokens: 24, 24 and 12 on cached blocks; the others whole
    assert sorted(set(replays)) == [4, 8, 16, 32] and len(replays) >= 8, replays
    assert tokens == ref_tokens, (tokens, ref_tokens)
    assert len(hidden) == len(ref_hidden)
    for step, (h, r) in enumerate(zip(hidden, ref_hidden, strict=True)):
        torch.testing.assert_close(h, r, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    assert_same_prompt_logprobs(lp, ref_lp)
    print("replays", replays, "tokens", tokens)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below replays the real graphs")
def test_capture_time_forward_serves_each_one_request_step(llama: Path) -> None:
    assert "replays" in run_interpreted(SCRIPT, str(llama))


def _gpu_runner(path: Path, eager: bool) -> ModelRunner:
    config = ModelConfig(str(path), dtype="float32", attention_backend="triton", enforce_eager=eager)
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=64), 8, 64, "cuda")
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


def _count_replays(graphs: Any) -> list[int]:
    """The bucket of every replay of `graphs` from now on (none when there are no graphs)."""
    replays: list[int] = []
    if graphs is not None:
        assert graphs.sizes == [16, 32, 64]
        replay = graphs.replay
        graphs.replay = lambda size: (replays.append(size), replay(size))[1]
    return replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_graphs_equal_eager(llama: Path) -> None:
    results: list[Any] = []
    for eager in (True, False):
        runner = _gpu_runner(llama, eager)
        graphs = runner.prefill_graphs
        assert (graphs is None) == eager
        replays = _count_replays(graphs)
        results.append(_run(runner, budget=48))
        assert eager or sorted(set(replays)) == [16, 32, 64], replays
    (tokens, hidden, lp), (graph_tokens, graph_hidden, graph_lp) = results
    assert graph_tokens == tokens
    for h, h_graph in zip(hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h, atol=1e-4, rtol=1e-4)
    assert_same_prompt_logprobs(graph_lp, lp)


def test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from treadle_model_runner import envs

    assert envs.TREADLE_PREFILL_GRAPHS()  # on by default
    monkeypatch.setenv("TREADLE_PREFILL_GRAPHS", "0")
    assert not envs.TREADLE_PREFILL_GRAPHS()
    monkeypatch.setenv("TREADLE_PREFILL_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="TREADLE_PREFILL_GRAPHS"):
        envs.TREADLE_PREFILL_GRAPHS()


def test_graph_mode_names_the_prefill_buckets() -> None:
    from types import SimpleNamespace

    from treadle_model_runner.runner.describe import graph_mode

    def graphs(sizes: list[int]) -> SimpleNamespace:
        return SimpleNamespace(sizes=sizes)  # runner/cuda_graph.GraphSet's captured sizes

    runner = SimpleNamespace(
        device=torch.device("cuda"), model_config=SimpleNamespace(enforce_eager=False),
        attn_backend=SimpleNamespace(name="triton"), graphs=graphs([1, 2, 4]), piecewise=graphs([16, 32]),
        prefill_graphs=graphs([16, 32, 64]), verify_graphs=None, mixed_graphs=None, lora=None,
    )  # fmt: skip
    assert graph_mode(runner) == (
        "decode sizes 1-4 (3 graphs); piecewise buckets 16-32 (2); one-request prefill buckets 16-64 (3)"
    )
    runner.verify_graphs = SimpleNamespace(
        graphs=graphs([1, 2, 4]), query_len=5
    )  # speculative decoding, k = 4
    assert graph_mode(runner).endswith("; verify batches of <= 5 tokens a request 1-4 (3)")
    runner.verify_graphs = None
    runner.mixed_graphs = SimpleNamespace(graphs=graphs([16, 32]))  # steps of several requests, whole
    assert graph_mode(runner).endswith("; mixed batches of 16-32 tokens (2)")
    runner.mixed_graphs = None
    runner.prefill_graphs = None  # a backend without them, or TREADLE_PREFILL_GRAPHS=0
    assert graph_mode(runner) == "decode sizes 1-4 (3 graphs); piecewise buckets 16-32 (2)"
    runner.lora = object()  # LoRA on: every set in two variants (runner/lora_graphs.py)
    assert graph_mode(runner).endswith("; each with and without the LoRA path")
