"""Full CUDA graphs for steps of several requests that are not decode-only (runner/batch_graphs.py): verify graphs
(speculative decoding: every request at most 1 + k tokens) and mixed graphs (any such step up to a token bucket).

What they rely on: launches captured for N one-token dummy requests, with the metadata of N requests of 1 to Q
tokens over the graph's token rows, replayed on the step buffers holding R <= N real requests (a decoding row's
last token and its drafts, a row without drafts, prefill chunks on cached blocks, short prompts whole), padded
with one-token dummy requests and rows that belong to no request. CPU: Triton's interpreter runs the capture-time
forward (built once per size before any request, as the capture builds it) on each such step instead of the
step's own forward, against the torch backend: the same greedy and seeded tokens and hidden states. GPU
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
from treadle_model_runner.runner.batch_graphs import MixedGraphs, VerifyGraphs
from treadle_model_runner.runner.cuda_graph import GraphSizes
from treadle_model_runner.runner.graphs import batch_plan, padded_size

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


def _mixed_workload(runner: ModelRunner) -> tuple[dict[str, list[int]], list[torch.Tensor], list[list[int]]]:
    """A 30-token prompt alone, then eleven more of 2 to 70 tokens joining two every other step, scheduled like the
    engine under a 40-token budget (decodes first, then prefill chunks, a long prompt's on top of its cached
    blocks), up to 8 at once. Returns each request's tokens, each step's hidden states and each step's tokens per
    request."""
    sched = FakeScheduler(runner, seed=3)
    hidden = record_hidden(runner)
    gen = torch.Generator().manual_seed(12)
    lengths = [30, 3, 17, 40, 9, 70, 5, 33, 12, 2, 25, 6]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9, seed=5)]
    joins = {0: [0], **{2 * k: [2 * k - 1, 2 * k] for k in range(1, 6)}, 12: [11]}
    shapes: list[list[int]] = []
    step = 0
    while sched.requests or step <= max(joins):
        for i in joins.get(step, []):
            prompt = torch.randint(1, VOCAB, (lengths[i],), generator=gen).tolist()
            sched.add(f"m{i}", prompt, params[i % 2], max_tokens=10 + i % 4)
        plan: dict[str, int] = {}
        left = 40
        for req in list(sched.requests.values())[:8]:
            n = min(req.num_tokens - req.num_computed, left)
            if n > 0:
                plan[req.req_id], left = n, left - n
        if plan:
            shapes.append(list(plan.values()))
            sched.step(plan)
        step += 1
    return sched.done_outputs, hidden, shapes


SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from test_runner_fakes import make_runner
    from test_runner_batch_graphs import K, _mixed_workload, _workload
    from treadle_model_runner import SpeculativeConfig
    from treadle_model_runner.runner.batch_graphs import (
        MixedGraphs, VerifyGraphs, capture_mixed, capture_verify, mixed_sizes, verify_sizes)

    class CaptureTimeForwards:
        \"\"\"Stands in for a set of graphs: each size's forward built before any request (as the capture builds
        it), run on the step buffers the real step filled (as a replay runs the graph).\"\"\"

        def __init__(self, capture, sizes):
            self.sizes = sizes
            self.forwards = {n: capture(n) for n in sizes}
            self.replays = []

        def padded_size(self, n):
            return next((s for s in self.sizes if s >= n), None)

        def replay(self, n):
            self.replays.append(n)
            return self.forwards[n]()

    path, which = sys.argv[1], sys.argv[2]
    results = {}
    for backend in ("torch", "triton"):
        spec = SpeculativeConfig(num_speculative_tokens=K) if which == "verify" else None
        runner = make_runner(path, max_num_seqs=8, attention_backend=backend, speculative_config=spec)
        if backend == "triton":
            assert runner.attn_backend.supports_batch_graphs
            if which == "verify":
                assert verify_sizes(runner) == [1, 2, 4, 8]
                stand_in = CaptureTimeForwards(lambda n: capture_verify(runner, n), verify_sizes(runner))
                runner.verify_graphs = VerifyGraphs(stand_in, 1 + K)
            else:
                assert mixed_sizes(runner) == [16, 32, 64]
                stand_in = CaptureTimeForwards(lambda t: capture_mixed(runner, t), mixed_sizes(runner))
                runner.mixed_graphs = MixedGraphs(stand_in, 8)
        results[backend] = _workload(runner) if which == "verify" else _mixed_workload(runner)
    (ref_tokens, ref_hidden, ref_shapes), (tokens, hidden, shapes) = results["torch"], results["triton"]
    assert shapes == ref_shapes
    if which == "verify":
        taken = [s for s in shapes if 1 < max(s) <= 1 + K]
        # 3 requests pad to 4 (one dummy request), 4 and 5 run without one (rows past them belong to no request)
        assert {4, 8} <= set(stand_in.replays), (stand_in.replays, shapes)
        assert any(len(s) == 3 for s in taken) and any(len(s) == 4 for s in taken), shapes
        assert any(len(s) == 4 and 1 < sum(s) < 4 * (1 + K) for s in taken), shapes
        assert any(s[-1] == 4 and len(s) == 4 for s in shapes), shapes  # r3's prefill rode in a verify graph
    else:
        taken = [s for s in shapes if max(s) > 1]
        assert set(stand_in.replays) == {16, 32, 64}, stand_in.replays
        assert any(len(s) == 8 for s in taken) and any(len(s) == 1 for s in taken), shapes
    assert len(stand_in.replays) == len(taken), (stand_in.replays, shapes)
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
    out = run_interpreted(SCRIPT, str(llama), "verify")
    assert "replays" in out
    steps, tokens = int(out.split("steps ")[1].split()[0]), int(out.split("tokens ")[1].split()[0])
    assert steps < tokens - 10, out  # drafts were kept: fewer steps than tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below replays the real graphs")
def test_capture_time_forward_serves_each_mixed_step(llama: Path) -> None:
    assert "replays" in run_interpreted(SCRIPT, str(llama), "mixed")


def test_which_steps_take_which_graphs() -> None:
    decode, prefill, pieces = GraphSizes([1, 2, 4, 8]), GraphSizes([16, 32, 64]), GraphSizes([16, 32, 64])
    verify = VerifyGraphs(GraphSizes([1, 2, 4, 8]), query_len=6)  # type: ignore[arg-type]
    mixed = MixedGraphs(GraphSizes([16, 32, 64]), max_num_seqs=8)  # type: ignore[arg-type]

    def pads(*q: int, mixed: Any = None) -> tuple[str | None, int | None, int | None]:
        n = np.array(q, dtype=np.int64)
        chosen = batch_plan(n, prefill, verify, mixed)  # type: ignore[arg-type]
        kind = None if chosen is None else ("verify" if chosen[0] is verify else "mixed")
        reqs = None if chosen is None else chosen[1].reqs
        return kind, reqs, padded_size(n, decode, prefill, pieces, verify, mixed)  # type: ignore[arg-type]

    assert pads(1, 1, 1) == (None, None, 4)  # decode-only: the decode graphs
    assert pads(6, 1, 3) == ("verify", 4, 24)  # 3 requests of <= 6 tokens: 4 requests of 6 rows
    assert pads(2) == ("verify", 1, 6)
    assert pads(*[2] * 8) == ("verify", 8, 48)
    assert pads(7, 1) == (None, None, 16)  # a request longer than 1 + k: piecewise
    assert pads(*[2] * 9) == (None, None, 32)  # more requests than captured
    assert pads(7, 1, mixed=mixed) == ("mixed", 8, 16)  # mixed graphs: 16 rows, min(8, 16) requests
    assert pads(40, 1, 1, mixed=mixed) == ("mixed", 8, 64)
    assert pads(40, mixed=mixed) == (None, None, 64)  # one request: the one-request prefill graphs
    assert pads(70, 1, mixed=mixed) == (None, None, None)  # past the largest bucket: eager
    assert pads(1, 1, mixed=mixed) == (None, None, 2)


def _gpu_runner(path: Path, eager: bool, spec: bool = True) -> ModelRunner:
    config = ModelConfig(str(path), dtype="float32", attention_backend="triton", enforce_eager=eager)
    speculative = SpeculativeConfig(num_speculative_tokens=K) if spec else None
    runner = ModelRunner(config, CacheConfig(block_size=16, num_gpu_blocks_override=64), 8, 64, "cuda",
                         speculative_config=speculative)  # fmt: skip
    runner.load_model()
    runner.initialize_kv_cache()
    return runner


def _counting(replay: Any, replays: list[int]) -> Any:
    def counted(n: int) -> torch.Tensor:
        replays.append(n)
        return replay(n)

    return counted


def _graphs_against_eager(path: Path, which: str) -> None:
    """The workload on the eager runner, then replaying the real graphs: the same tokens and hidden states."""
    results: list[Any] = []
    for eager in (True, False):
        runner = _gpu_runner(path, eager, spec=which == "verify")
        graphs = runner.verify_graphs if which == "verify" else runner.mixed_graphs
        assert (graphs is None) == eager
        replays: list[int] = []
        if graphs is not None:
            assert graphs.graphs.sizes == ([1, 2, 4, 8] if which == "verify" else [16, 32, 64])
            assert which == "verify" or runner.piecewise is None  # the mixed graphs take their steps
            graphs.graphs.replay = _counting(graphs.graphs.replay, replays)  # type: ignore[method-assign]
        results.append(_workload(runner) if which == "verify" else _mixed_workload(runner))
        assert eager or ({4, 8} if which == "verify" else {16, 32, 64}) <= set(replays), replays
        release_gpu_runner(runner)
        del runner, graphs
    (tokens, hidden, shapes), (graph_tokens, graph_hidden, graph_shapes) = results
    assert graph_shapes == shapes and graph_tokens == tokens
    for h, h_graph in zip(hidden, graph_hidden, strict=True):
        torch.testing.assert_close(h_graph, h, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["verify", "mixed"])
def test_batch_graphs_equal_eager(llama: Path, which: str) -> None:
    _graphs_against_eager(llama, which)
