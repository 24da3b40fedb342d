"""Full CUDA graphs for steps that verify draft tokens (speculative decoding): every request of the step schedules
at most Q = 1 + num_speculative_tokens tokens (its last token and its drafts; a row with no drafts one).

Without them such a step (several requests, not decode-only) runs piecewise graphs around eager attention. A step
of 32 requests verifying drafts took 9.5-9.7 ms against 5.95 for a plain decode step (Llama-3.1-8B shapes, H200,
benchmarks/results/gpu-spec-lora-tp-h200-ad6d9af/call5); the eager attention layers launch their kernels from
Python one by one.

What lets one graph serve many steps: a backend with ``supports_verify_graphs`` reads the step only from the
persistent device metadata (query_start_loc, seq_lens, block tables, slot mappings), and the host integers baked
into its launches (N requests, N * Q token rows, queries of 1 to Q tokens) bound the step instead of describing
it. Triton's unified kernel finds each program's request through query_start_loc and lets surplus programs
exit, and it splits short (decode-like) and longer queries between two launches by each request's length on the
device.

Capture, per request count N (the decode capture sizes with N * Q within the step buffers, largest first, one
memory pool): the buffers hold N one-token dummy requests over the null block (as the decode graphs' padding),
the other token rows padding (slot -1), and the metadata says N requests of 1 to Q tokens over N * Q rows.
Replay: prepare_inputs writes the step's R <= N requests, N - R one-token dummy requests after them, and padding
rows up to N * Q that belong to no request; their hidden states are never read.
``TREADLE_VERIFY_GRAPHS=0`` turns them off (those steps run piecewise again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from treadle_model_runner import envs
from treadle_model_runner.forward_context import ForwardContext, set_forward_context
from treadle_model_runner.runner.cuda_graph import GraphSet, capture_sizes
from treadle_model_runner.runner.inputs import prepare_inputs

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

__all__ = ["VerifyGraphs", "prepare_verify_capture", "verify_graphs_wanted", "verify_sizes"]


class VerifyGraphs:
    """A model's verify graphs (`graphs`, by request count) for steps of at most `query_len` tokens a request."""

    def __init__(self, graphs: GraphSet, query_len: int) -> None:
        self.graphs = graphs
        self.query_len = query_len

    def requests_for(self, num_scheduled: np.ndarray) -> int | None:
        """The request count a step of `num_scheduled` tokens per request pads to, or None when these graphs do
        not take it (decode-only, a request with more than `query_len` tokens, or more requests than captured)."""
        if len(num_scheduled) == 0 or (num_scheduled == 1).all() or int(num_scheduled.max()) > self.query_len:
            return None
        return self.graphs.padded_size(len(num_scheduled))

    def release(self) -> None:
        self.graphs.release()


def verify_graphs_wanted(runner: ModelRunner) -> bool:
    return (
        runner.num_speculative_tokens > 0
        and bool(runner.attn_backend.supports_verify_graphs)
        and envs.TREADLE_VERIFY_GRAPHS()
    )


def verify_sizes(runner: ModelRunner) -> list[int]:
    """Request counts to capture: the decode capture sizes whose N * (1 + k) tokens fit the step buffers."""
    tokens = max(runner.max_num_batched_tokens, runner.max_num_seqs)
    query_len = 1 + runner.num_speculative_tokens
    return [n for n in capture_sizes(runner.max_num_seqs) if n * query_len <= tokens]


def prepare_verify_capture(runner: ModelRunner, num_reqs: int) -> Callable[[], torch.Tensor]:
    """The dummy step of `num_reqs` one-token requests over N * Q token rows, with the metadata of N requests of 1
    to Q tokens, and the forward of the runner's model over it."""
    query_len = 1 + runner.num_speculative_tokens
    size = num_reqs * query_len
    inputs = prepare_inputs(runner.batch, np.zeros(0, dtype=np.int64), runner.buffers, size,
                            num_padded_reqs=num_reqs)  # fmt: skip
    # the host copies (query_start_loc_cpu) show one-token queries, so the shortest query is 1
    metadata = [replace(m, max_query_len=query_len) for m in inputs.attn_metadata]
    built = [b.build(m) for b, m in zip(runner.builders, metadata, strict=True)]
    context = ForwardContext(runner.kv_caches, [built[g] for g in runner.layer_to_group], size)
    model = runner._require_model()

    def forward() -> torch.Tensor:
        with set_forward_context(context):
            return model(inputs.input_ids, inputs.positions)

    return forward
