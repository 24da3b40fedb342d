"""The ``flashinfer`` attention backend (optional extra ``treadle-kernels[flashinfer]``, CUDA only).

FlashInfer describes a paged cache in CSR form: request ``i`` owns pages ``indices[indptr[i]:indptr[i + 1]]`` and
its last page holds ``last_page_len[i]`` tokens (1..block_size). The builder derives these from the block table once
per step. Kernels must be *planned* (host-side scheduling) before they run, and a plan depends on per-layer facts
(head counts, head size, scale, sliding window, soft-cap, dtype) that the builder does not know; so the step's
metadata keeps one planned wrapper per distinct layer signature, planned by the first layer that asks for it and
reused by every other layer of that kind (Gemma 3 plans twice a step: sliding and global layers).

Decode-only steps use ``BatchDecodeWithPagedKVCacheWrapper``; anything with a longer query (prefill, chunked
prefill, mixed) uses ``BatchPrefillWithPagedKVCacheWrapper`` with the causal mask (FlashInfer aligns queries to
the end of the context, the same ``seq_len - query_len + i`` convention as ours). The cache layout is NHD, which
is exactly ``kv_cache[0]`` / ``kv_cache[1]`` of our ``(2, num_blocks, block_size, nkv, head_size)`` cache. Our
window ``W`` (``key > query - W``) is FlashInfer's inclusive ``window_left = W - 1``. One 128 MiB float workspace
is allocated per builder and shared by all its wrappers (they run one after another on one stream).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from treadle_kernels.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    write_kv_cache,
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
    """One step's common metadata plus FlashInfer's CSR page table and the wrappers planned so far.

    ``plan`` copies its index arrays to the device itself, so the host-side ones are kept on the host (no sync).
    """

    common: AttentionMetadata
    paged_kv_indptr: torch.Tensor  # [num_reqs + 1] int32 (host): prefix sums of pages per request
    paged_kv_indices: torch.Tensor  # [total_pages] int32 (device): physical page ids, request after request
    paged_kv_last_page_len: torch.Tensor  # [num_reqs] int32 (host): tokens in each request's last page
    builder: FlashInferMetadataBuilder
    planned: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # layer signature -> planned wrapper


class FlashInferMetadataBuilder(AttentionMetadataBuilder):
    def __init__(self, block_size: int, device: torch.device | str) -> None:
        super().__init__(block_size, device)
        self._flashinfer = _import_flashinfer()
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._wrappers: dict[tuple[Any, ...], Any] = {}  # (kind, layer signature) -> wrapper, created once

    def build(self, common: AttentionMetadata) -> FlashInferMetadata:
        bs = self.block_size
        seq_lens = common.seq_lens_cpu.long()
        pages = (seq_lens + bs - 1) // bs  # [num_reqs]
        indptr = torch.zeros(len(pages) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(pages, 0)
        last_page_len = (seq_lens - (pages - 1) * bs).to(torch.int32)
        table = common.block_table
        used = torch.arange(table.shape[1], device=table.device)[None, :] < pages.to(table.device)[:, None]
        indices = table[used].to(torch.int32)  # row-major: request after request
        return FlashInferMetadata(
            common=common,
            paged_kv_indptr=indptr,
            paged_kv_indices=indices,
            paged_kv_last_page_len=last_page_len,
            builder=self,
        )

    def wrapper(
        self, md: FlashInferMetadata, impl: AttentionImpl, dtype: torch.dtype, kv_dtype: torch.dtype
    ) -> Any:
        """The wrapper for this layer's signature, planned for this step (planned at most once per step)."""
        signature = (impl.num_heads, impl.num_kv_heads, impl.head_size, impl.scale, impl.sliding_window,
                     impl.logits_soft_cap, dtype, kv_dtype)  # fmt: skip
        if signature in md.planned:
            return md.planned[signature]
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"attention backend 'flashinfer' supports float16/bfloat16 activations, got {dtype}; "
                "use --dtype bfloat16 or --attention-backend triton."
            )
        common = md.common
        decode = common.is_decode_only and common.causal
        key = ("decode" if decode else "prefill", *signature)
        fi = self._flashinfer
        if key not in self._wrappers:
            if decode:
                use_tc = impl.num_heads // impl.num_kv_heads >= 4
                self._wrappers[key] = fi.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_tensor_cores=use_tc
                )
            else:
                self._wrappers[key] = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        wrapper = self._wrappers[key]
        window_left = impl.sliding_window - 1 if impl.sliding_window is not None else -1
        if decode:
            wrapper.plan(
                md.paged_kv_indptr, md.paged_kv_indices, md.paged_kv_last_page_len,
                impl.num_heads, impl.num_kv_heads, impl.head_size, self.block_size,
                window_left=window_left, logits_soft_cap=impl.logits_soft_cap, sm_scale=impl.scale,
                q_data_type=dtype, kv_data_type=kv_dtype,
            )  # fmt: skip
        else:
            wrapper.plan(
                common.query_start_loc_cpu, md.paged_kv_indptr, md.paged_kv_indices, md.paged_kv_last_page_len,
                impl.num_heads, impl.num_kv_heads, impl.head_size, self.block_size,
                causal=common.causal, window_left=window_left, logits_soft_cap=impl.logits_soft_cap,
                sm_scale=impl.scale, q_data_type=dtype, kv_data_type=kv_dtype,
            )  # fmt: skip
        md.planned[signature] = wrapper
        return wrapper


class FlashInferAttentionImpl(AttentionImpl):
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
    builder_cls = FlashInferMetadataBuilder
    impl_cls = FlashInferAttentionImpl
