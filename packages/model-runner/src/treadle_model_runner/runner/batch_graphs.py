"""Full CUDA graphs for steps of several requests that are not decode-only, where the attention backend reads the
step from device metadata only (``supports_batch_graphs``: Triton's unified kernel):

  verify   speculative decoding's steps: every request schedules at most Q = 1 + k tokens (its last token and its
           drafts; a row with no drafts one); by request count N (the decode capture sizes), N * Q token rows
  mixed    any other such step of up to T tokens (T a piecewise token bucket): prefill chunks beside decodes,
           several short prompts; T token rows, N = min(max_num_seqs, T) requests

Without them these steps run piecewise graphs around eager attention, whose layers launch their kernels from Python
one by one. A step of 32 requests verifying drafts took 9.5-9.7 ms against 5.95 for a plain decode step
(Llama-3.1-8B shapes, H200, benchmarks/results/gpu-spec-lora-tp-h200-ad6d9af/call5) and 8.1-8.6 ms on verify
graphs (gpu-session31-h200-278f0f4/call1); an eager or piecewise 16-token prefill took 8-19 ms of host time for
~4.5 ms of GPU work (gpu-latency-norm-h200-890ddaa).

What lets one graph serve many steps: the backend's launches read the step only from the persistent device
metadata (query_start_loc, seq_lens, block tables, slot mappings), and the host integers baked into them (N
requests, the token rows, queries of 1 to Q tokens) bound the step instead of describing it. Triton's unified
kernel finds each program's request through query_start_loc and lets surplus programs exit, and it splits short
(decode-like) and longer queries between two launches by each request's length on the device.

Capture, per size (largest first, one memory pool): the step buffers hold N empty dummy requests (no tokens,
context 0: every program exits at once), the token rows padding (slot -1), and the metadata says N requests of 1
to Q tokens over those rows. Replay: prepare_inputs writes the step's R <= N requests, N - R empty dummy requests
after them, and padding rows up to the graph's that belong to no request; their hidden states are never read.
(Empty, not one-token, dummies: a mixed step of T - 1 tokens in two requests leaves one row for N - 2 dummies.)
``TREADLE_VERIFY_GRAPHS=0`` / ``TREADLE_MIXED_GRAPHS=0`` turn either set off (those steps run piecewise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from treadle_model_runner import envs
from treadle_model_runner.forward_context import ForwardContext, set_forward_context
from treadle_model_runner.runner.cuda_graph import CudaGraphRunner, GraphSet, capture_sizes
from treadle_model_runner.runner.inputs import prepare_inputs
from treadle_model_runner.runner.lora_graphs import as_one_set, capture_set
from treadle_model_runner.runner.piecewise import token_buckets

if TYPE_CHECKING:
    from treadle_model_runner.lora.layer import TokenMask
    from treadle_model_runner.runner.model_runner import ModelRunner

__all__ = [
    "BatchGraphs",
    "GraphPlan",
    "MixedGraphs",
    "VerifyGraphs",
    "capture_batch_graphs",
    "capture_mixed",
    "capture_verify",
    "mixed_sizes",
    "prepare_batch_capture",
    "verify_graphs_wanted",
    "verify_sizes",
]


class GraphPlan(NamedTuple):
    """How a step replays one of these graphs: its size (the key), and the tokens and requests it pads to."""

    size: int
    tokens: int
    reqs: int


class BatchGraphs:
    """A set of these graphs (`graphs`, possibly two LoRA variants) and which steps it takes."""

    def __init__(self, graphs: GraphSet) -> None:
        self.graphs = graphs

    def plan(self, num_scheduled: np.ndarray) -> GraphPlan | None:
        raise NotImplementedError

    def release(self) -> None:
        self.graphs.release()


class VerifyGraphs(BatchGraphs):
    """By request count, for steps of at most `query_len` tokens a request."""

    def __init__(self, graphs: GraphSet, query_len: int) -> None:
        super().__init__(graphs)
        self.query_len = query_len

    def plan(self, num_scheduled: np.ndarray) -> GraphPlan | None:
        """None when these graphs do not take the step: decode-only, a request of more than `query_len` tokens,
        or more requests than captured."""
        if len(num_scheduled) == 0 or (num_scheduled == 1).all() or int(num_scheduled.max()) > self.query_len:
            return None
        n = self.graphs.padded_size(len(num_scheduled))
        return GraphPlan(n, n * self.query_len, n) if n is not None else None


class MixedGraphs(BatchGraphs):
    """By token bucket T, each over min(`max_num_seqs`, T) requests, for any step that is not decode-only."""

    def __init__(self, graphs: GraphSet, max_num_seqs: int) -> None:
        super().__init__(graphs)
        self.max_num_seqs = max_num_seqs

    def plan(self, num_scheduled: np.ndarray) -> GraphPlan | None:
        """None for a decode-only step or one of more tokens than the largest bucket."""
        if len(num_scheduled) == 0 or (num_scheduled == 1).all():
            return None
        size = self.graphs.padded_size(int(num_scheduled.sum()))
        return GraphPlan(size, size, min(self.max_num_seqs, size)) if size is not None else None


def verify_graphs_wanted(runner: ModelRunner) -> bool:
    return (
        runner.num_speculative_tokens > 0
        and bool(runner.attn_backend.supports_batch_graphs)
        and envs.TREADLE_VERIFY_GRAPHS()
    )


def verify_sizes(runner: ModelRunner) -> list[int]:
    """Request counts to capture: the decode capture sizes whose N * (1 + k) tokens fit the step buffers."""
    tokens = max(runner.max_num_batched_tokens, runner.max_num_seqs)
    query_len = 1 + runner.num_speculative_tokens
    return [n for n in capture_sizes(runner.max_num_seqs) if n * query_len <= tokens]


def mixed_graphs_wanted(runner: ModelRunner) -> bool:
    return bool(runner.attn_backend.supports_batch_graphs) and envs.TREADLE_MIXED_GRAPHS()


def capture_verify(runner: ModelRunner, num_reqs: int) -> Callable[[], torch.Tensor]:
    """The verify graph of `num_reqs` requests' capture (prepare_batch_capture)."""
    query_len = 1 + runner.num_speculative_tokens
    return prepare_batch_capture(runner, num_reqs, num_reqs * query_len, query_len)


def capture_mixed(runner: ModelRunner, num_tokens: int) -> Callable[[], torch.Tensor]:
    """The mixed graph of `num_tokens` token rows' capture (prepare_batch_capture)."""
    return prepare_batch_capture(runner, min(runner.max_num_seqs, num_tokens), num_tokens, num_tokens)


def prepare_batch_capture(
    runner: ModelRunner,
    num_reqs: int,
    num_tokens: int,
    max_query_len: int,
    model: torch.nn.Module | None = None,
) -> Callable[[], torch.Tensor]:
    """The dummy step of `num_reqs` empty requests over `num_tokens` padding rows, with the metadata of that many
    requests of 1 to `max_query_len` tokens, and the forward of `model` (default: the runner's; a draft model's
    two-token passes, draft_model.py) over it."""
    inputs = prepare_inputs(runner.batch, np.zeros(0, dtype=np.int64), runner.buffers, num_tokens,
                            num_padded_reqs=num_reqs)  # fmt: skip
    # the host copies (query_start_loc_cpu) show empty queries: builders plan for a shortest query of 0, so Triton
    # launches short and long queries apart (triton_backend.paged_attention)
    metadata = [replace(m, max_query_len=max_query_len) for m in inputs.attn_metadata]
    built = [b.build(m) for b, m in zip(runner.builders, metadata, strict=True)]
    context = ForwardContext(runner.kv_caches, [built[g] for g in runner.layer_to_group], num_tokens)
    model = model if model is not None else runner._require_model()

    def forward() -> torch.Tensor:
        with set_forward_context(context):
            return model(inputs.input_ids, inputs.positions)

    return forward


def capture_batch_graphs(runner: ModelRunner, mask: TokenMask | None) -> list[GraphSet]:
    """Capture the verify and the mixed graphs (where wanted; with LoRA, both variants of each, `mask`), set them on
    the runner (None: not wanted, or the capture failed) and return every capture made."""
    sizes = verify_sizes(runner) if verify_graphs_wanted(runner) else []
    query_len = 1 + runner.num_speculative_tokens
    verify = capture_set(
        mask, lambda kind: CudaGraphRunner(sizes, f"verify batch of <= {query_len} tokens a request{kind}"),
        lambda g, pool: g.capture(lambda n: capture_verify(runner, n), pool),
    ) if sizes else []  # fmt: skip
    captured = as_one_set(verify, mask)
    runner.verify_graphs = VerifyGraphs(captured, query_len) if captured is not None else None
    buckets = mixed_sizes(runner)
    mixed = capture_set(
        mask, lambda kind: CudaGraphRunner(buckets, "mixed batch" + kind),
        lambda g, pool: g.capture(lambda t: capture_mixed(runner, t), pool),
    ) if buckets else []  # fmt: skip
    captured = as_one_set(mixed, mask)
    runner.mixed_graphs = MixedGraphs(captured, runner.max_num_seqs) if captured is not None else None
    return [*verify, *mixed]


def mixed_sizes(runner: ModelRunner) -> list[int]:
    """Token buckets of the mixed graphs (the piecewise graphs' buckets) when wanted, else none."""
    return token_buckets(runner.max_num_batched_tokens) if mixed_graphs_wanted(runner) else []
