"""Piecewise CUDA graphs for steps that are not decode-only (prefills, chunked prefills, mixed batches).

A decode graph holds a whole forward because a decode batch's attention launches depend only on its padded
size. A prefill's do not (query lengths, context lengths, the backend's plan), so here the forward is cut at
every attention call: the code between two attention calls (o_proj, the MLP, the next norm and qkv_proj: all
row-independent) is one CUDA graph per token bucket, and attention runs eagerly between the graphs on the step's
real metadata. An eager prefill launches ~11 kernels per layer from Python, which on a GPU costs several times
the kernels' own time at small token counts; replayed, each piece is one launch.

    graphs = PiecewiseGraphs(bucket_sizes(max_num_batched_tokens))
    graphs.capture(make_forward)    # once, after the KV cache exists (graphs.prepare_piecewise_capture)
    hidden = graphs.replay(bucket)                         # inside the step's forward context

Capture. `make_forward(bucket)` returns a forward over the persistent input buffers with a forward context
whose `split_attention` is this module's recorder: at each attention call it allocates the layer's output (in
the graphs' pool), ends the current graph, remembers (layer, q, k, v, rope, output) and begins the next graph.
The attention call itself does not run at capture. Buckets are captured largest first into one pool.

Replay. graph 0; layer 0's attention on the remembered tensors (the graph just wrote them), into the remembered
output; graph 1; ... ; the last graph writes the hidden states. Tokens in [T, bucket) are padding (id 0,
position 0, slot -1): they flow through the row-independent pieces, and the attention backends attend only to
the metadata's num_actual_tokens, leaving their output rows unwritten. Nobody reads those rows' results.

Memory: each bucket keeps, per attention layer, its q/k/v storage and its output alive (the eager attention
reads and writes them between replays); the pool's transient memory is shared by all buckets.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from treadle_model_runner import envs
from treadle_model_runner.forward_context import ForwardContext, set_forward_context
from treadle_model_runner.runner.cuda_graph import GraphSizes, free_after_emptying_cache

logger = logging.getLogger(__name__)

MIN_BUCKET = 16


def bucket_sizes(max_tokens: int) -> list[int]:
    """Token buckets 16, 32, 64, ... up to max_tokens (included); empty below 16 tokens."""
    if max_tokens < MIN_BUCKET:
        return []
    sizes = []
    size = MIN_BUCKET
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return [*sizes, max_tokens]


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """The graphs' token buckets for steps that are not decode-only (piecewise; mixed, batch_graphs.py): powers of
    two from 16 up to TREADLE_PIECEWISE_MAX_TOKENS, within the step budget."""
    return bucket_sizes(min(envs.TREADLE_PIECEWISE_MAX_TOKENS(), max_num_batched_tokens))


@dataclass(slots=True)
class _Split:
    """One attention call of a captured forward: what the graph before it wrote, and where the next reads."""

    layer: Any  # the Attention layer (layers/attention.py)
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    rope: Any  # treadle_kernels.attention.Rope | None
    output: torch.Tensor


class _Recorder:
    """The forward context's `split_attention` while a bucket is captured (or warmed up, `capturing=False`)."""

    def __init__(self, pool: Any, capturing: bool) -> None:
        self.pool = pool
        self.capturing = capturing
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.splits: list[_Split] = []

    def begin(self) -> None:
        if self.capturing:
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool)
            self.graphs.append(graph)

    def end(self) -> None:
        if self.capturing:
            self.graphs[-1].capture_end()

    def __call__(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 rope: Any) -> torch.Tensor:  # fmt: skip
        shape = (query.shape[0], layer.num_heads * layer.head_size)
        # zeros at warm-up (the attention does not run: keep the pieces after it on finite values)
        output = query.new_empty(shape) if self.capturing else query.new_zeros(shape)
        self.end()
        self.splits.append(_Split(layer, query, key, value, rope, output))
        self.begin()
        return output

    def abort(self) -> None:
        """End a capture an exception interrupted (the stream must leave capture mode)."""
        if self.capturing and self.graphs:
            with contextlib.suppress(RuntimeError):  # already ended: the exception came between pieces
                self.graphs[-1].capture_end()


@dataclass(slots=True)
class _Bucket:
    graphs: list[torch.cuda.CUDAGraph]
    splits: list[_Split]
    output: torch.Tensor


class PiecewiseGraphs(GraphSizes):
    def __init__(self, sizes: list[int], kind: str = "") -> None:
        """`kind`: what the log adds to 'piecewise CUDA graphs' (a LoRA variant)."""
        super().__init__(sizes)
        self.kind = kind
        self.buckets: dict[int, _Bucket] = {}
        self.held_bytes_by_size: dict[int, int] = {}  # bucket -> attention inputs / outputs it keeps alive

    @property
    def is_captured(self) -> bool:
        return bool(self.buckets)

    def has(self, size: int) -> bool:
        return size in self.buckets

    def capture(
        self, make_forward: Callable[[int, Any], Callable[[], torch.Tensor]], pool: Any = None
    ) -> None:
        """`make_forward(bucket, split_attention)` returns the forward of `bucket` tokens to capture in pieces;
        `pool`: shared with graphs that never run at the same time (default: a new one)."""
        start = time.perf_counter()
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        try:
            with torch.inference_mode(), torch.cuda.stream(stream):
                for size in reversed(self.sizes):
                    free = free_after_emptying_cache()
                    make_forward(size, _Recorder(pool, capturing=False))()  # warm-up: compile, settle
                    torch.cuda.synchronize()
                    recorder = _Recorder(pool, capturing=True)
                    forward = make_forward(size, recorder)
                    recorder.begin()
                    try:
                        output = forward()
                    except BaseException:
                        recorder.abort()
                        raise
                    recorder.end()
                    torch.cuda.synchronize()
                    self.buckets[size] = _Bucket(recorder.graphs, recorder.splits, output)
                    self.memory_by_size[size] = max(0, free - torch.cuda.mem_get_info()[0])
                    self.held_bytes_by_size[size] = _held_bytes(recorder.splits)
        except RuntimeError as exc:
            logger.warning("piecewise CUDA graph capture failed (%s); prefills run eagerly", str(exc))
            self.buckets.clear()
            self.memory_by_size.clear()
            self.held_bytes_by_size.clear()
            return
        logger.info("piecewise CUDA graphs%s captured for token buckets %s in %.1f s, using %.0f MiB of device "
                    "memory", self.kind, self.sizes, time.perf_counter() - start,
                    self.memory_bytes / (1 << 20))  # fmt: skip

    def replay(self, size: int) -> torch.Tensor:
        """Run bucket `size`'s pieces with eager attention between them (inside the step's forward context)."""
        bucket = self.buckets[size]
        for graph, split in zip(bucket.graphs, bucket.splits, strict=False):
            graph.replay()
            split.layer.attend(split.query, split.key, split.value, split.rope, split.output)
        bucket.graphs[-1].replay()
        return bucket.output

    def release(self) -> None:
        """Free every bucket's graphs now (see cuda_graph.release_graphs)."""
        for bucket in self.buckets.values():
            for graph in bucket.graphs:
                graph.reset()
        self.buckets.clear()


def _held_bytes(splits: list[_Split]) -> int:
    """Device memory the splits keep alive: each distinct storage once (q, k, v are views of one qkv)."""
    storages: dict[int, int] = {}
    for s in splits:
        for t in (s.query, s.key, s.value, s.output):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def piecewise_forward(
    model: torch.nn.Module, kv_caches: list[torch.Tensor], input_ids: torch.Tensor, positions: torch.Tensor,
    split_attention: Callable[..., torch.Tensor],
) -> Callable[[], torch.Tensor]:  # fmt: skip
    """The forward to capture over the persistent `input_ids` / `positions` views (zeroed: the warm-up runs it)."""
    input_ids.zero_()
    positions.zero_()
    context = ForwardContext(kv_caches, [None] * len(kv_caches), input_ids.shape[0], split_attention)

    def forward() -> torch.Tensor:
        with set_forward_context(context):
            return model(input_ids, positions)

    return forward
