"""CUDA graphs for decode-only batches: capture the model forward once per batch size, replay it every step.

Capture sizes are 1, 2, 4, 8, then steps of 8 up to max_num_seqs (max_num_seqs itself included); a decode batch
of n requests is padded up to the smallest captured size >= n with one-token dummy requests over the null
block (slot -1: nothing is written). Inputs and attention metadata live in persistent device buffers that the
runner rewrites before each replay, so the graph reads the step's values; host integers baked into the
captured launches (token count, request count, max_query_len = 1) are exactly those of the padded batch.
Only backends with `supports_cuda_graphs` are captured (the runner checks); their metadata builders build the
dummy batch's metadata (`build_for_cuda_graph`) and rewrite any state of their own on the host before each
replay (`prepare_cuda_graph_replay`: FlashInfer re-plans its graph-mode decode wrappers there). Sizes are captured
largest first into one memory pool, so the smaller graphs reuse the larger one's memory.

Release. A graph that captured a collective keeps its NCCL communicator busy: destroying the process group waits
for the graph forever (pytorch#115388). `release()` frees a runner's graphs at once; tensor-parallel ranks call
`ModelRunner.release_graphs` before they leave the group, and the memory probe releases its own captures.

Memory. Before the KV cache is sized, `graph_memory.probe_graph_bytes` captures the largest and the smallest size
over a one-block cache and extrapolates what all sizes will take (the largest graph's pool and executable, then
one more executable and backend buffers per size); the runner leaves that much free, and logs what the real
capture took against it.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class GraphSet(Protocol):
    """What the runner asks of a set of captured graphs (decode, piecewise, one-request prefill, or a set's two
    LoRA variants, lora_graphs.py)."""

    sizes: list[int]

    @property
    def memory_bytes(self) -> int: ...

    @property
    def is_captured(self) -> bool: ...

    def padded_size(self, n: int) -> int | None: ...

    def has(self, size: int) -> bool: ...

    def replay(self, size: int) -> torch.Tensor: ...

    def release(self) -> None: ...


def free_after_emptying_cache() -> int:
    """Free device memory once the allocator's cache is returned. `torch.cuda.graph` empties the cache as a capture
    begins, so a capture's memory is measured from here: from before the cache it would return, that return hid
    what the capture took (the first probe capture measured 0 MiB against 104 MiB taken, session 32)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info()[0])


class GraphSizes:
    """The sizes a set of graphs is captured at and the device memory each took (decode graphs: requests;
    piecewise graphs, piecewise.py: tokens)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sorted(sizes)
        self.memory_by_size: dict[int, int] = {}  # size -> device memory its warm-up and capture took

    @property
    def memory_bytes(self) -> int:
        """Device memory the capture took: the graphs' private pool, their executables, backend buffers
        (FlashInfer's graph-mode wrappers); it comes out of the headroom gpu_memory_utilization leaves."""
        return sum(self.memory_by_size.values())

    def padded_size(self, n: int) -> int | None:
        """Smallest captured size >= n (None when the step is larger than every graph)."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None


class CudaGraphRunner(GraphSizes):
    """Whole-forward graphs by size: decode batches (requests), or one-request prefills (tokens,
    prefill_graphs.py); `kind` names them in the log."""

    def __init__(self, sizes: list[int], kind: str = "decode batch") -> None:
        super().__init__(sizes)
        self.kind = kind
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> the graph's output hidden states [size, hidden]

    @property
    def is_captured(self) -> bool:
        return bool(self.graphs)

    def has(self, size: int) -> bool:
        return size in self.graphs

    def capture(self, make_forward: Callable[[int], Callable[[], torch.Tensor]], pool: Any = None) -> None:
        """`make_forward(size)` prepares a dummy batch of `size` and returns the forward to capture; `pool`: a
        memory pool shared with other graphs that never run at the same time (default: a new one)."""
        start = time.perf_counter()
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        try:
            with torch.inference_mode():
                for size in reversed(self.sizes):
                    free = free_after_emptying_cache()
                    forward = make_forward(size)
                    forward()  # warm-up: compile kernels, settle the allocator
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self.outputs[size] = forward()
                    self.graphs[size] = graph
                    torch.cuda.synchronize()
                    self.memory_by_size[size] = max(0, free - torch.cuda.mem_get_info()[0])
        except RuntimeError as exc:
            logger.warning("CUDA graph capture failed (%s); running eagerly", str(exc))
            self.graphs.clear()
            self.outputs.clear()
            self.memory_by_size.clear()
            return
        logger.info("CUDA graphs captured for %s sizes %s in %.1f s, using %.0f MiB of device memory",
                    self.kind, self.sizes, time.perf_counter() - start, self.memory_bytes / (1 << 20))  # fmt: skip

    def replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]

    def release(self) -> None:
        """Free every graph now rather than whenever its last reference goes (see `release_graphs`)."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
