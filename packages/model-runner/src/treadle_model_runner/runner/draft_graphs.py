"""A draft model's CUDA graphs (draft_model.py), over the runner's step buffers and KV cache like the target's:

  graphs          decode graphs at the runner's capture sizes: passes of one token a row
  piecewise       piecewise graphs at the token buckets: pass 0 after a prefill chunk of several requests
  prefill_graphs  one-request prefill graphs at the same buckets (where the backend allows them)
  pairs           whole graphs of N requests of two tokens each (batch_graphs.VerifyGraphs with query length 2,
                  where the backend allows them): the first pass after a decode or verification step, which
                  writes the draft's KV at the last scheduled position and drafts from the new sample at once

Captured after the target's graphs; the memory probe captures the same at the largest and the smallest size
(graph_memory.py). A capture that fails leaves that set None: those passes run eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from treadle_model_runner.runner.batch_graphs import VerifyGraphs, prepare_batch_capture
from treadle_model_runner.runner.cuda_graph import CudaGraphRunner, GraphSet, capture_sizes
from treadle_model_runner.runner.graphs import prepare_decode_capture, prepare_prefill_capture
from treadle_model_runner.runner.piecewise import PiecewiseGraphs, piecewise_forward

if TYPE_CHECKING:
    from treadle_model_runner.runner.model_runner import ModelRunner

__all__ = ["DraftGraphs", "pair_sizes"]


def pair_sizes(runner: ModelRunner, decode_sizes: list[int]) -> list[int]:
    """The request counts of `decode_sizes` whose two tokens a request fit the step buffers, where the attention
    backend takes whole graphs of several requests (else none)."""
    if not runner.attn_backend.supports_batch_graphs:
        return []
    tokens = max(runner.max_num_batched_tokens, runner.max_num_seqs)
    return [n for n in decode_sizes if 2 * n <= tokens]


class DraftGraphs:
    """The draft model's graph sets (module docstring); None where not captured."""

    def __init__(self) -> None:
        self.graphs: CudaGraphRunner | None = None
        self.piecewise: PiecewiseGraphs | None = None
        self.prefill_graphs: CudaGraphRunner | None = None
        self.pair_graphs: CudaGraphRunner | None = None
        self.pairs: VerifyGraphs | None = None  # pair_graphs as the runner plans and replays them

    def capture(
        self,
        runner: ModelRunner,
        model: torch.nn.Module,
        piecewise_sizes: list[int],
        prefill_graphs: bool,
        decode_sizes: list[int] | None = None,
        kind: str = "",
        pairs: bool = True,
    ) -> None:
        """Capture `model`'s decode graphs (`decode_sizes`, default the runner's capture sizes), with `pairs` its
        two-token graphs (the same request counts that fit), its piecewise graphs (`piecewise_sizes` tokens) and, with
        `prefill_graphs`, its one-request prefill graphs (the same buckets). `kind` adds to their names in the log
        (the memory probe's)."""
        sizes = decode_sizes if decode_sizes is not None else capture_sizes(runner.max_num_seqs)
        decode = CudaGraphRunner(sizes, "draft model decode batch" + kind)
        decode.capture(lambda size: prepare_decode_capture(runner, size, model))
        self.graphs = decode if decode.is_captured else None
        two = CudaGraphRunner(
            pair_sizes(runner, sizes) if pairs else [], "draft model two-token batch" + kind
        )
        if two.sizes:
            two.capture(lambda n: prepare_batch_capture(runner, n, 2 * n, 2, model))
        self.pair_graphs = two if two.is_captured else None
        self.pairs = VerifyGraphs(two, 2) if two.is_captured else None
        buffers = runner.buffers
        pieces = PiecewiseGraphs(piecewise_sizes, " (draft model)" + kind)
        if piecewise_sizes:
            pieces.capture(lambda size, split: piecewise_forward(model, runner.kv_caches, buffers.input_ids[:size],
                           buffers.positions[:size], split))  # fmt: skip
        self.piecewise = pieces if pieces.is_captured else None
        prefill = CudaGraphRunner(piecewise_sizes, "draft model one-request prefill" + kind)
        if piecewise_sizes and prefill_graphs:
            prefill.capture(lambda size: prepare_prefill_capture(runner, size, model))
        self.prefill_graphs = prefill if prefill.is_captured else None

    def captured(self) -> list[GraphSet]:
        """Every captured set (for their memory)."""
        sets: list[GraphSet | None] = [self.graphs, self.piecewise, self.prefill_graphs, self.pair_graphs]
        return [g for g in sets if g is not None]

    @property
    def memory_bytes(self) -> int:
        """Device memory its captured graphs took."""
        return sum(g.memory_bytes for g in self.captured())

    def release(self) -> None:
        for graphs in self.captured():
            graphs.release()
        self.graphs = self.piecewise = self.prefill_graphs = self.pair_graphs = None
        self.pairs = None
