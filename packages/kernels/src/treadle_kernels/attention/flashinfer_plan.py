"""What a FlashInfer plan is made of: one layer's signature and the step's page table in FlashInfer's CSR form.

FlashInfer describes a paged cache in CSR form: request ``i`` owns pages ``indices[indptr[i]:indptr[i + 1]]`` and
its last page holds ``last_page_len[i]`` tokens (1..block_size). ``indptr`` and ``last_page_len`` are computed on
the host from ``seq_lens_cpu`` (``plan`` schedules from them there); ``indices`` is gathered from the device block
table on the device, its length known on the host, so building a page table never waits for the GPU.

A plan also depends on per-layer facts the builder does not know until a layer asks: ``LayerSignature``. Our
window ``W`` (``key > query - W``) is FlashInfer's inclusive ``window_left = W - 1``; no window is ``-1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from treadle_ir.ops.cache import FP8_KV_CACHE_DTYPES
from treadle_kernels.attention.backend import AttentionImpl
from treadle_kernels.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class LayerSignature:
    """The per-layer facts a FlashInfer plan depends on; layers with equal signatures share one plan per step."""

    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads
    head_size: int  # elements per head
    scale: float  # softmax scale applied to q.k
    sliding_window: int | None  # keys a query sees, itself included; None: full attention
    logits_soft_cap: float | None  # cap * tanh(logits / cap); None: no cap
    dtype: torch.dtype  # query and output dtype
    kv_dtype: torch.dtype  # KV-cache dtype

    @classmethod
    def of(cls, impl: AttentionImpl, dtype: torch.dtype, kv_dtype: torch.dtype) -> LayerSignature:
        return cls(impl.num_heads, impl.num_kv_heads, impl.head_size, impl.scale, impl.sliding_window,
                   impl.logits_soft_cap, dtype, kv_dtype)  # fmt: skip

    @property
    def window_left(self) -> int:
        return self.sliding_window - 1 if self.sliding_window is not None else -1

    @property
    def decode_uses_tensor_cores(self) -> bool:
        """Whether the decode wrapper should run FlashInfer's tensor-core (prefill-kernel) path.

        Facts, FlashInfer 0.6.18.post1: the CUDA-core decode kernel is compiled for GQA group sizes 1, 2, 3, 4,
        6, 8 only (``DISPATCH_GQA_GROUP_SIZE``, include/flashinfer/utils.cuh:142-164; other sizes raise
        "Unsupported group_size"); the wrapper's docstring says tensor cores are "faster for large group size"
        (flashinfer/decode.py:848-849) without a number. FlashInfer's maintainer gave the number: tensor cores
        when the group size is > 4 for fp16/bf16, CUDA cores faster at 4 (vllm-project/vllm#7887 review,
        sgl-project/sglang#2169). So group > 4 (which also covers every size the CUDA-core kernel lacks); the
        Llama-3.1-8B case (32 / 8 = 4) takes CUDA cores. vLLM has since used tensor cores for every group size
        (vllm-project/vllm#23214): measure group 4 both ways on H100 before changing this line.
        ``TREADLE_FLASHINFER_DECODE_TENSOR_CORES=1`` / ``=0`` forces one path, for that measurement.

        An fp8 cache takes tensor cores at every group size: on an H200 (Llama-3.1-8B layer, group 4) the CUDA-core
        kernel decoded 256 x 1.5k tokens in 677 us and the tensor-core path in 372 us, and 64 x 4k in 591 against
        231 us (benchmarks/results/gpu-fp8-attention-h200-55933cc/call1).
        """
        forced = os.environ.get("TREADLE_FLASHINFER_DECODE_TENSOR_CORES")
        if forced in ("0", "1"):
            return forced == "1"
        return self.num_heads // self.num_kv_heads > 4 or self.kv_dtype in FP8_KV_CACHE_DTYPES


@dataclass(frozen=True)
class PageTable:
    """One step's paged KV in FlashInfer's CSR form."""

    indptr: torch.Tensor  # [num_reqs + 1] int32 (host): prefix sums of pages per request
    indices: torch.Tensor  # [num_pages] int32 (device): physical page ids, request after request
    last_page_len: torch.Tensor  # [num_reqs] int32 (host): tokens in each request's last page, 1..block_size

    @property
    def num_pages(self) -> int:
        return int(self.indices.shape[0])


def gather_page_indices(
    block_table: torch.Tensor,  # [num_reqs, max_blocks_per_req] int32 (device)
    seq_lens: torch.Tensor,  # [num_reqs] int32 (device): context length of each request
    block_size: int,
    num_pages: int,  # sum of ceil(seq_lens / block_size), known on the host
) -> torch.Tensor:
    """``block_table[i, :pages[i]]`` of every request, concatenated ``[num_pages]`` int32, without a host sync.

    Page slot ``j`` belongs to the request whose page range holds it (a binary search over the page prefix sums),
    so the output length comes from the host and no boolean mask (which would sync) is needed.
    """
    pages = (seq_lens.long() + block_size - 1) // block_size  # [num_reqs]
    ends = torch.cumsum(pages, 0)  # [num_reqs] end of each request's page range
    slot = torch.arange(num_pages, device=block_table.device)  # [num_pages]
    req = torch.searchsorted(ends, slot, right=True)  # [num_pages] request owning each page slot
    page = slot - (ends[req] - pages[req])  # [num_pages] logical page within that request
    return block_table[req, page].to(torch.int32)


def build_page_table(common: AttentionMetadata, block_size: int) -> PageTable:
    """The step's CSR page table: host ``indptr`` / ``last_page_len`` and device ``indices``."""
    seq_lens = common.seq_lens_cpu.long()
    pages = (seq_lens + block_size - 1) // block_size  # [num_reqs]
    indptr = torch.zeros(len(pages) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0)
    last_page_len = (seq_lens - (pages - 1) * block_size).to(torch.int32)
    indices = gather_page_indices(common.block_table, common.seq_lens, block_size, int(indptr[-1]))
    return PageTable(indptr, indices, last_page_len)


def plan_decode(wrapper: Any, pages: PageTable, sig: LayerSignature, block_size: int) -> None:
    """``BatchDecodeWithPagedKVCacheWrapper.plan`` (flashinfer/decode.py:1280) for one layer signature."""
    wrapper.plan(
        pages.indptr, pages.indices, pages.last_page_len,
        sig.num_heads, sig.num_kv_heads, sig.head_size, block_size,
        window_left=sig.window_left, logits_soft_cap=sig.logits_soft_cap, sm_scale=sig.scale,
        q_data_type=sig.dtype, kv_data_type=sig.kv_dtype,
    )  # fmt: skip


def plan_prefill(
    wrapper: Any, common: AttentionMetadata, pages: PageTable, sig: LayerSignature, block_size: int
) -> None:
    """``BatchPrefillWithPagedKVCacheWrapper.plan`` (flashinfer/prefill.py:2120) for one layer signature."""
    wrapper.plan(
        common.query_start_loc_cpu, pages.indptr, pages.indices, pages.last_page_len,
        sig.num_heads, sig.num_kv_heads, sig.head_size, block_size,
        causal=common.causal, window_left=sig.window_left, logits_soft_cap=sig.logits_soft_cap,
        sm_scale=sig.scale, q_data_type=sig.dtype, kv_data_type=sig.kv_dtype,
    )  # fmt: skip
