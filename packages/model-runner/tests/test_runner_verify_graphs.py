"""Full CUDA graphs for steps verifying draft tokens (runner/verify_graphs.py).

What they rely on: launches captured for N one-token dummy requests, with the metadata of N requests of 1 to Q
tokens over N * Q rows, replayed on the step buffers holding R <= N real requests of at most Q tokens each (a
decoding row's last token and its drafts, a row without drafts, a short prompt's whole prefill), padded with
one-token dummy requests and rows that belong to no request. CPU: Triton's interpreter runs the capture-time
forward (built once per request count before any request, as the capture builds it) on each such step instead
of the step's own forward, against the torch backend: the same greedy and seeded tokens and hidden states. GPU
(``-m gpu``): the replayed graphs against the eager runner on the Triton backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_runner_fakes import FakeScheduler, record_hidden, release_gpu_runner, run_interpreted, save_llama

from treadle_model_runner import CacheConfig, ModelConfig, SamplingParams, SpeculativeConfig
from treadle_model_runner.runner import ModelRunner
from treadle_model_runner.runner.cuda_graph import GraphSizes
from treadle_model_runner.runner.graphs import padded_size
from treadle_model_runner.runner.verify_graphs import VerifyGraphs

pytest.importorskip("triton")
VOCAB = 128
K = 5  # drafts a request at most: steps of up to 6 tokens a request take the verify graphs


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama_verify"), 9, vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)  # fmt: skip


def _ngram_drafts(tokens: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the last earlier occurrence of the last token (drafts a tiny model's loops
    often keep)."""
    last = tokens[-1]
    earlier = [j for j in range(len(tokens) - 1) if tokens[j] == last]
    return tokens[earlier[-1] + 1 : earlier[-1] + 1 + k] if earlier and k else []


def _workload(runner: ModelRunner) -> tuple[dict[str, list[int]], list[torch.Tensor], list[list[int]]]:
    """Three requests, then a fourth whose 4-token prompt is prefilled beside the others' drafts, then a fifth
    whose 20-token prompt is not (longer than 1 + K); each decoding request verifies 0 to K n-gram drafts a step.
    Returns each request's tokens, each step's hidden states and each step's tokens per request."""
    sched = FakeScheduler(runner, seed=2)
    hidden = record_hidden(runner)
    gen = torch.Generator().manual_seed(11)
    lengths = {"r0": 9, "r1": 5, "r2": 12, "r3": 4, "r4": 20}
    prompts = {r: torch.randint(1, VOCAB, (n,), generator=gen).tolist() for r, n in lengths.items()}
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=30, seed=7)]
    joins = {0: ["r0", "r1", "r2"], 3: ["r3"], 6: ["r4"]}
    shapes: list[list[int]] = []
    step = 0
    while sched.requests or step <= max(joins):
        for i, req_id in enumerate(joins.get(step, [])):
            sched.add(req_id, prompts[req_id], params[(i + step) % 2], max_tokens=24)
        plan, drafts = {}, {}
        for i, (req_id, req) in enumerate(sched.requests.items()):
            if req.num_computed < req.num_tokens - 1:
                plan[req_id] = req.num_tokens - req.num_computed  # its whole prompt
                continue
            left = req.max_tokens - len(req.output) - 1
            drafts[req_id] = _ngram_drafts(req.prompt + req.output, min((step + i) % (K + 1), left))
            plan[req_id] = 1 + len(drafts[req_id])
        shapes.append(list(plan.values()))
        sched.step(plan, drafts)
        step += 1
    return sched.done_outputs, hidden, shapes


SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from test_runner_fakes import make_runner
    from test_runner_verify_graphs import K, _workload
    from treadle_model_runner import SpeculativeConfig
    from treadle_model_runner.runner.verify_graphs import VerifyGraphs, prepare_verify_capture, verify_sizes

    class CaptureTimeForwards:
        \"\"\"Stands in for the verify graphs: each request count's forward built before any request (as the
        capture builds it), run on the step buffers the real step filled (as a replay runs the graph).\"\"\"

        def __init__(self, runner, sizes):
            self.sizes = sizes
            self.forwards = {n: prepare_verify_capture(runner, n) for n in sizes}
            self.replays = []

        def padded_size(self, n):
            return next((s for s in self.sizes if s >= n), None)

        def replay(self, n):
            self.replays.append(n)
            return self.forwards[n]()

    path = sys.argv[1]
    results = {}
    for backend in ("torch", "triton"):
        runner = make_runner(path, max_num_seqs=8, attention_backend=backend,
                             speculative_config=SpeculativeConfig(num_speculative_tokens=K))
        if backend == "triton":
            assert runner.attn_backend.supports_verify_graphs and verify_sizes(runner) == [1, 2, 4, 8]
            stand_in = CaptureTimeForwards(runner, verify_sizes(runner))
            runner.verify_graphs = VerifyGraphs(stand_in, 1 + K)
        results[backend] = _workload(runner)
    (ref_tokens, ref_hidden, ref_shapes), (tokens, hidden, shapes) = results["torch"], results["triton"]
    assert shapes == ref_shapes
    verify_steps = [s for s in shapes if max(s) <= 1 + K and max(s) > 1]
    # 3 requests pad to 4 (one dummy request), 4 and 5 run without one (rows past them belong to no request)
    assert {4, 8} <= set(stand_in.replays) and len(stand_in.replays) == len(verify_steps), (
        stand_in.replays, shapes)
    assert any(len(s) == 3 for s in verify_steps) and any(len(s) == 4 for s in verify_steps), shapes
    assert any(len(s) == 4 and 1 < sum(s) < 4 * (1 + K) for s in verify_steps), shapes
    assert any(s[-1] == 4 and len(s) == 4 for s in shapes), shapes  # r3's prefill rode in a verify graph
    assert tokens == ref_tokens, (tokens, ref_tokens)
    assert len(hidden) == len(ref_hidden)
    for step, (h, r) in enumerate(zip(hidden, ref_hidden, strict=True)):
        torch.testing.assert_close(h, r, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    kept = sum(len(t) for t in tokens.values())
    print("replays", stand_in.replays, "steps", len(shapes), "tokens", kept)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below replays the real graphs")
def test_capture_time_forward_serves_each_verify_step(llama: Path) -> None:
    out = run_interpreted(SCRIPT, str(llama))
    assert "replays" in out
    steps, tokens = int(out.split("steps ")[1].split()[0]), int(out.split("tokens ")[1].split()[0])
    assert steps < tokens - 10, out  # drafts were kept: fewer steps than tokens


def test_which_steps_take_the_verify_graphs() -> None:
    verify = VerifyGraphs(GraphSizes([1, 2, 4, 8]), query_len=6)  # type: ignore[arg-type]
    decode = GraphSizes([1, 2, 4, 8])
    pieces = GraphSizes([16, 32, 64])

    def pads(*q: int) -> tuple[int | None, int | None]:
        n = np.array(q, dtype=np.int64)
        return verify.requests_for(n), padded_size(n, decode, None, pieces, verify)  # type: ignore[arg-type]

    assert pads(1, 1, 1) == (None, 4)  # decode-only: the decode graphs
    assert pads(6, 1, 3) == (4, 24)  # 3 requests of <= 6 tokens: 4 requests of 6 rows
    assert pads(2) == (1, 6)
    assert pads(*[2] * 8) == (8, 48)
    assert pads(7, 1) == (None, 16)  # a request longer than 1 + k: piecewise
    assert pads(*[2] * 9) == (None, 32)  # more requests than captured


def _gpu_runner(path: Path, eager: bool) -> ModelRunner:
    config = ModelConfig(str(path), dtype="float32", attention_backend="triton", enforce_eager=eager)
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=64), 8, 64, "cuda",
                         speculative_config=SpeculativeConfig(num_speculative_tokens=K))  # fmt: skip
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


def _counting(replay: Any, replays: list[int]) -> Any:
    def counted(n: int) -> torch.Tensor:
        replays.append(n)
        return replay(n)

    return counted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_graphs_equal_eager(llama: Path) -> None:
    results: list[Any] = []
    for eager in (True, False):
        runner = _gpu_runner(llama, eager)
        verify = runner.verify_graphs
        assert (verify is None) == eager
        replays: list[int] = []
        if verify is not None:
            assert verify.graphs.sizes == [1, 2, 4, 8]
            verify.graphs.replay = _counting(verify.graphs.replay, replays)  # type: ignore[method-assign]
        results.append(_workload(runner))
        assert eager or {4, 8} <= set(replays), replays
        release_gpu_runner(runner)
        del runner, verify
    (tokens, hidden, shapes), (graph_tokens, graph_hidden, graph_shapes) = results
    assert graph_shapes == shapes and graph_tokens == tokens
    for h, h_graph in zip(hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h, atol=1e-4, rtol=1e-4)
