"""FlashInfer decode inside CUDA graphs: one graph-mode decode wrapper per (captured batch size, layer signature).

A replayed graph launches FlashInfer's kernels with the device pointers and host scalars of its capture, so
whatever changes between replays must be rewritten in place before each one. FlashInfer's graph mode
(``BatchDecodeWithPagedKVCacheWrapper(..., use_cuda_graph=True, paged_kv_*_buffer=...)``, flashinfer/decode.py:
818-946) is built for that, with these facts (FlashInfer 0.6.18.post1):

- the batch size is fixed per wrapper, ``len(paged_kv_last_page_len_buffer)`` (decode.py:941), and ``run`` takes
  it from that buffer's length (decode.py:1977): each wrapper gets views of exactly ``[size + 1]`` / ``[size]``;
- ``plan`` copies ``indptr`` and ``last_page_len`` into the caller's buffers and ``indices`` into the first
  ``len(indices)`` entries of the indices buffer (decode.py:1493-1503; a device-to-device copy, no sync, when
  ``indices`` is on the device), and writes its schedule into the wrapper's own int workspace;
- in graph mode the schedule's shape depends on the batch size only: the decode kernel always splits KV and pads
  its grid to ``max_grid_size / num_kv_heads`` or ``batch_size`` (include/flashinfer/attention/scheduler.cuh:204,
  444; the tensor-core path likewise, scheduler.cuh:129), so a graph captured once stays valid as contexts grow.

So ``plan`` runs on the host before every replay (never inside a graph): capture plans each wrapper for the dummy
batch, and the runner calls ``prepare_cuda_graph_replay`` before each replay to plan it for the real one.

The CSR buffers are shared by all wrappers of one builder: only one graph replays at a time, and it is planned
right before, so other sizes may overwrite them in between. They hold the first (largest: the runner captures
largest first) batch size at ``max_blocks_per_req`` pages per request; a larger size seen later gets buffers of
its own. The KV cache's block count is no bound: with prefix caching several requests list the same block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from treadle_kernels.attention.flashinfer_plan import LayerSignature


@dataclass(frozen=True)
class PageTableBuffers:
    """Fixed device buffers that graph-mode wrappers read their CSR page table from."""

    indptr: torch.Tensor  # [max_reqs + 1] int32 (device)
    last_page_len: torch.Tensor  # [max_reqs] int32 (device)
    indices: torch.Tensor  # [max_reqs * max_blocks_per_req] int32 (device)

    @classmethod
    def allocate(cls, max_reqs: int, max_blocks_per_req: int, device: torch.device) -> PageTableBuffers:
        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=device)

        return cls(zeros(max_reqs + 1), zeros(max_reqs), zeros(max_reqs * max_blocks_per_req))

    @property
    def max_reqs(self) -> int:
        return int(self.last_page_len.shape[0])

    def can_hold(self, num_reqs: int, max_blocks_per_req: int) -> bool:
        """Whether any batch of ``num_reqs`` requests, each up to ``max_blocks_per_req`` pages, fits."""
        return num_reqs <= self.max_reqs and num_reqs * max_blocks_per_req <= self.indices.shape[0]


class GraphDecodeWrappers:
    """The graph-mode decode wrappers of one metadata builder, created on first use and kept for its lifetime."""

    def __init__(self, flashinfer: Any, workspace: torch.Tensor) -> None:
        self._flashinfer = flashinfer
        self.workspace = workspace  # float workspace shared with the builder's eager wrappers (one stream)
        self.buffers: PageTableBuffers | None = None  # the buffers new wrappers get views of
        self._wrappers: dict[int, dict[LayerSignature, Any]] = {}  # batch size -> signature -> wrapper

    def get(self, num_reqs: int, sig: LayerSignature, max_blocks_per_req: int) -> Any:
        """The wrapper for decode batches of exactly ``num_reqs`` requests and layers of signature ``sig``."""
        by_sig = self._wrappers.setdefault(num_reqs, {})
        if sig not in by_sig:
            if self.buffers is None or not self.buffers.can_hold(num_reqs, max_blocks_per_req):
                self.buffers = PageTableBuffers.allocate(num_reqs, max_blocks_per_req, self.workspace.device)
            buf = self.buffers
            by_sig[sig] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=sig.decode_uses_tensor_cores,
                paged_kv_indptr_buffer=buf.indptr[: num_reqs + 1],
                paged_kv_indices_buffer=buf.indices,
                paged_kv_last_page_len_buffer=buf.last_page_len[:num_reqs],
            )
        return by_sig[sig]

    def for_size(self, num_reqs: int) -> dict[LayerSignature, Any]:
        """Every wrapper made for batches of ``num_reqs`` requests (what a replay of that graph launches)."""
        return self._wrappers.get(num_reqs, {})
