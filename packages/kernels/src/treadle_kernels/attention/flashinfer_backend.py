"""The ``flashinfer`` attention backend (optional extra ``treadle-kernels[flashinfer]``, CUDA only).

Kernels must be *planned* (host-side scheduling) before they run, from the step's page table in FlashInfer's CSR
form (``flashinfer_plan.py``) and per-layer facts (head counts, head size, scale, sliding window, soft-cap, dtype)
that the builder does not know; so the step's metadata keeps one planned wrapper per distinct layer signature,
planned by the first layer that asks for it and reused by every other layer of that kind (Gemma 3 plans twice a
step: sliding and global layers).

Decode-only steps use ``BatchDecodeWithPagedKVCacheWrapper``; anything with a longer query (prefill, chunked
prefill, mixed) uses ``BatchPrefillWithPagedKVCacheWrapper`` with the causal mask (FlashInfer aligns queries to
the end of the context, the same ``seq_len - query_len + i`` convention as ours). Decode batches replayed from a
CUDA graph use graph-mode decode wrappers, one per batch size, re-planned before each replay
(``flashinfer_graphs.py``). The cache layout is NHD, which is exactly ``kv_cache[0]`` / ``kv_cache[1]`` of our
``(2, num_blocks, block_size, nkv, head_size)`` cache. One 128 MiB float workspace is allocated per builder and
shared by all its wrappers (they run one after another on one stream).

An fp8 cache (``--kv-cache-dtype fp8``) is planned with ``kv_data_type`` fp8 and read at unit scale (``run``'s
``k_scale`` / ``v_scale`` default to 1.0), our cache's semantics. Facts, FlashInfer 0.6.18.post1: both decode
paths read an fp8 cache beside a 16-bit query (we take the tensor-core one: ``LayerSignature``); prefill takes the
FA2 kernels on every GPU, because its Hopper (FA3) kernels read an fp8 cache only beside an fp8 query
(``is_fa3_backend_supported``, flashinfer/utils.py:463).

Attention sinks (gpt-oss) are not planned into these wrappers: an impl built with sinks raises, naming the backends
that have them (``triton``, ``torch``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from treadle_kernels.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    refuse_sinks,
    write_kv_cache,
)
from treadle_kernels.attention.flashinfer_graphs import GraphDecodeWrappers
from treadle_kernels.attention.flashinfer_plan import (
    LayerSignature,
    PageTable,
    build_page_table,
    plan_decode,
    plan_prefill,
)
from treadle_kernels.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

_WORKSPACE_BYTES = 128 * 1024 * 1024


def _import_flashinfer() -> Any:
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError(
            "attention backend 'flashinfer' needs the flashinfer-python package: install "
            "treadle-kernels[flashinfer] (pip install flashinfer-python), or pick --attention-backend triton."
        ) from exc
    return flashinfer


@dataclass
class FlashInferMetadata:
    """One step's common metadata, its CSR page table, and the wrappers planned for it so far."""

    common: AttentionMetadata
    pages: PageTable  # the step's paged KV in FlashInfer's CSR form
    builder: FlashInferMetadataBuilder
    cuda_graph_size: int | None = None  # batch size of the decode graph being captured; None: eager
    planned: dict[LayerSignature, Any] = field(default_factory=dict)  # layer signature -> planned wrapper


class FlashInferMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, block_size: int, device: torch.device | str) -> None:
        super().__init__(block_size, device)
        self._flashinfer = _import_flashinfer()
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._wrappers: dict[tuple[str, LayerSignature], Any] = {}  # eager wrappers, created once
        self.graph_wrappers = GraphDecodeWrappers(self._flashinfer, self.workspace)
        self._plan_copied: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> set after its last plan's copy

    def build(self, common: AttentionMetadata) -> FlashInferMetadata:
        return FlashInferMetadata(common, build_page_table(common, self.block_size), self)

    def build_for_cuda_graph(self, common: AttentionMetadata, num_reqs: int) -> FlashInferMetadata:
        """The dummy batch's metadata: its layers create and plan the graph-mode wrappers of ``num_reqs``."""
        assert common.is_decode_only and common.num_reqs == num_reqs, (
            f"a decode graph of {num_reqs} requests was built from {common.num_reqs} requests "
            f"of up to {common.max_query_len} tokens"
        )
        return FlashInferMetadata(common, build_page_table(common, self.block_size), self, num_reqs)

    def prepare_cuda_graph_replay(self, common: AttentionMetadata, num_reqs: int) -> None:
        """Plan every graph-mode wrapper of ``num_reqs`` for this step: rewrites the buffers the graph reads."""
        wrappers = self.graph_wrappers.for_size(num_reqs)
        if not wrappers:
            return
        assert common.num_reqs == num_reqs, f"graph of {num_reqs} requests replayed for {common.num_reqs}"
        pages = build_page_table(common, self.block_size)
        for sig, wrapper in wrappers.items():
            self._plan(plan_decode, wrapper, pages, sig, self.block_size)

    def wrapper(
        self, md: FlashInferMetadata, impl: AttentionImpl, dtype: torch.dtype, kv_dtype: torch.dtype
    ) -> Any:
        """The wrapper for this layer's signature, planned for this step (planned at most once per step)."""
        sig = LayerSignature.of(impl, dtype, kv_dtype)
        if sig in md.planned:
            return md.planned[sig]
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend 'flashinfer' supports float16/bfloat16 activations, got {dtype}; "
                "use --dtype bfloat16 or --attention-backend triton."
            )
        common, pages, bs = md.common, md.pages, self.block_size
        fi = self._flashinfer
        if md.cuda_graph_size is not None:
            wrapper = self.graph_wrappers.get(md.cuda_graph_size, sig, common.block_table.shape[1])
            self._plan(plan_decode, wrapper, pages, sig, bs)
        elif common.is_decode_only and common.causal:
            key = ("decode", sig)
            if key not in self._wrappers:
                self._wrappers[key] = fi.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=sig.decode_uses_tensor_cores
                )
            wrapper = self._wrappers[key]
            self._plan(plan_decode, wrapper, pages, sig, bs)
        else:
            key = ("prefill", sig)
            if key not in self._wrappers:
                self._wrappers[key] = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            wrapper = self._wrappers[key]
            self._plan(plan_prefill, wrapper, common, pages, sig, bs)
        md.planned[sig] = wrapper
        return wrapper

    def _plan(self, plan: Callable[..., None], wrapper: Any, *args: Any) -> None:
        """``plan(wrapper, *args)`` once the device has consumed the wrapper's previous plan.

        ``plan`` stages its schedule in the wrapper's pinned host buffer and copies it to the device
        asynchronously; under async scheduling the host may plan the next step before the GPU ran that copy
        for the step in flight. So each wrapper's copy is fenced by an event; the copy was queued ahead of that
        step's attention kernels, so the wait is short or none.
        """
        if self.device.type != "cuda":
            plan(wrapper, *args)
            return
        copied = self._plan_copied.get(id(wrapper))
        if copied is None:
            copied = self._plan_copied[id(wrapper)] = torch.cuda.Event()
        copied.synchronize()
        plan(wrapper, *args)
        copied.record()


class FlashInferAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        # FlashInfer's wrappers here take no sink logits: a gpt-oss layer would silently attend without them
        refuse_sinks(FlashInferAttentionBackend.name, sinks)
        super().__init__(num_heads, head_size, scale, num_kv_heads, sliding_window, logits_soft_cap, sinks)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FlashInferMetadata,
        output: torch.Tensor,
    ) -> torch.Tensor:
        md = attn_metadata
        write_kv_cache(key, value, kv_cache, md.common.slot_mapping)
        num_tokens = md.common.num_actual_tokens
        if num_tokens == 0:
            return output
        wrapper = md.builder.wrapper(md, self, query.dtype, kv_cache.dtype)
        out = output[:num_tokens]
        target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
        wrapper.run(query[:num_tokens], (kv_cache[0], kv_cache[1]), out=target)
        if target is not out:
            out.copy_(target)
        return output


class FlashInferAttentionBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graphs = True
    supports_fp8_kv_cache = True
    builder_cls = FlashInferMetadataBuilder
    impl_cls = FlashInferAttentionImpl
