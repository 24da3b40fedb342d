"""The attention-backend contract: backend / metadata builder / implementation.

A backend is a class with three roles, so the model runner never branches on which one it holds:

- ``AttentionBackend`` (static facts): its ``name``, the KV-cache tensor shape it wants for one layer, and the two
  classes below.
- ``AttentionMetadataBuilder`` (once per step, shared by all layers): turns the backend-independent
  ``AttentionMetadata`` into whatever the backend's kernels consume (plans, split counts, extra index tensors).
  Backends with ``supports_cuda_graphs`` also serve decode CUDA graphs: ``build_for_cuda_graph`` before the
  capture of a batch size, ``prepare_cuda_graph_replay`` on the host before every replay of it.
- ``AttentionImpl`` (one per attention layer): holds the layer's head counts, scale, sliding window, logit
  soft-cap and attention sinks; ``forward`` first writes the step's new K/V into the paged cache through
  ``slot_mapping``, then attends every query token over the cached + new keys of its request.

Semantics shared by every backend (the torch backend is the reference): GQA with ``num_heads % num_kv_heads == 0``
(query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``); logits are ``scale * q.k``, then
``cap * tanh(logits / cap)`` when a soft-cap is set; a query at position ``p`` sees key positions ``k <= p``
(causal) and, with a sliding window ``W``, only ``k > p - W`` (HF transformers' ``sliding_window_overlay``: the
window holds ``W`` keys, the query's own included).

Attention sinks (gpt-oss): a layer may carry one learned logit per query head, ``sinks [num_heads]``, that joins
the softmax's denominator without a value: ``p_j = exp(l_j) / (sum_i exp(l_i) + exp(sink_h))`` over the keys the
query sees (the sliding window and the causal mask apply to keys only; the sink is always there), so a head may
put weight on "nothing" and its output shrinks towards 0; a query that sees no key outputs 0. The impl keeps a
reference to the caller's tensor (the model owns it as a parameter and may load weights into it later) and reads
it as float32 at each call. Only backends with ``supports_sinks`` honour it; the others refuse a layer with sinks.

Shared key/value (multi-head latent attention, DeepSeek's MLA): a layer whose key and value are one vector (the
latent, ``num_kv_heads`` 1) has one cache tensor ``[num_blocks, block_size, 1, head_size]``, and the
``kv_cache`` its impl sees is a stride-0 view ``[2, ...]`` over it (model-runner kv_cache.py): ``kv_cache[0]`` and
``kv_cache[1]`` are the same memory. Backends that read both through their own strides and write them through
``write_kv_cache`` (which writes the same rows twice to the same slots) set ``supports_shared_kv``; the others
are refused such layers by the runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from treadle_ir import ops
from treadle_kernels.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rope:
    """The rotary embedding a layer asks the backend to apply to q and k before attending (``forward_rope``):
    ``ops.rotary_embedding_`` semantics with these positions [T] and cos/sin table [max_position, rot_dim]."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool


class AttentionMetadataBuilder:
    """Builds a backend's per-step metadata; the default passes the common metadata through unchanged."""

    def __init__(self, block_size: int, device: torch.device | str) -> None:
        self.block_size = block_size  # tokens per KV-cache block
        self.device = torch.device(device)

    def build(self, common: AttentionMetadata) -> Any:
        return common

    def build_for_cuda_graph(self, common: AttentionMetadata, num_reqs: int) -> Any:
        """Metadata for capturing the decode graph of ``num_reqs`` one-token requests (a dummy batch).

        The graph keeps whatever device memory its launches read, and replays them with the host values of the
        capture. The default suits kernels that read only ``common``'s persistent device tensors (rewritten by
        the runner before every replay) and take no step-dependent host values: it is ``build(common)``.
        """
        return self.build(common)

    def prepare_cuda_graph_replay(self, common: AttentionMetadata, num_reqs: int) -> None:
        """Called on the host before each replay of the ``num_reqs`` decode graph, with the step's metadata.

        A backend whose captured kernels read state of its own (plans, page tables in fixed buffers) rewrites it
        here, outside the graph. The default does nothing.
        """


class AttentionImpl:
    """One attention layer's computation over the paged KV cache."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,  # [num_heads] sink logits (any float dtype), kept by reference
    ) -> None:
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads}) for "
                "grouped-query attention; check the model config's num_attention_heads / num_key_value_heads."
            )
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(
                f"sliding_window ({sliding_window}) must be a positive number of tokens or None (full attention)."
            )
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap ({logits_soft_cap}) must be > 0 or None (no soft-cap).")
        if sinks is not None and (
            sinks.dim() != 1
            or sinks.shape[0] != num_heads
            or not sinks.is_floating_point()
            or sinks.stride(0) != 1
        ):
            raise ValueError(
                f"attention sinks must be a contiguous 1-D float tensor of num_heads ({num_heads}) logits, got "
                f"shape {tuple(sinks.shape)} ({sinks.dtype}, strides {sinks.stride()}); pass this rank's slice "
                "of the layer's sinks, one per query head."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.sinks = sinks  # the caller's tensor itself (never a copy): weights loaded into it later are seen

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # backend's get_kv_cache_shape
        attn_metadata: Any,  # what the backend's builder returned
        output: torch.Tensor,  # [num_tokens, num_heads, head_size], written in place
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward_rope(
        self,
        rope: Rope,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size], not yet rotated
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], not yet rotated
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` on rotated q and k. This default rotates them in place first; a backend may fuse the
        rotation into its kernels instead (query and key then hold unspecified values afterwards)."""
        ops.rotary_embedding_(rope.positions, query.flatten(1), key.flatten(1), self.head_size, rope.cos_sin_cache,
                              rope.is_neox)  # fmt: skip
        return self.forward(query, key, value, kv_cache, attn_metadata, output)


class AttentionBackend:
    """Static description of a backend; subclasses set ``name`` and the two classes."""

    name: ClassVar[str] = ""
    # decode steps may be captured in CUDA graphs and replayed (see the builder's graph methods)
    supports_cuda_graphs: ClassVar[bool] = False
    # a step prefilling one request may be captured whole: a launch captured for one request of B query tokens
    # reads everything else from the persistent device metadata, so it serves any one request of up to B tokens
    supports_prefill_graphs: ClassVar[bool] = False
    # a step of up to N requests and T token rows, each request of at most Q query tokens, may be captured whole:
    # launches captured for N requests of 1 to Q tokens over T rows read the step from the persistent device
    # metadata only, so they serve any such step padded to N requests (the rest of the rows belong to no
    # request: never read, their outputs unspecified); speculative decoding's verification, mixed batches
    supports_batch_graphs: ClassVar[bool] = False
    # reads and writes a float8_e4m3fn / float8_e5m2 cache (unit scale; `--kv-cache-dtype fp8`)
    supports_fp8_kv_cache: ClassVar[bool] = False
    # every kernel launch goes through treadle_kernels.ops.launch.launch, so start-up may compile its variants
    # ahead under compile_only (model-runner runner/precompile.py) without running anything
    compiles_ahead: ClassVar[bool] = False
    # honours per-head attention sinks (gpt-oss; module docstring); a backend without them refuses such layers
    supports_sinks: ClassVar[bool] = False
    # runs layers whose key and value share one cache tensor (MLA's latent; module docstring)
    supports_shared_kv: ClassVar[bool] = False
    builder_cls: ClassVar[type[AttentionMetadataBuilder]] = AttentionMetadataBuilder
    impl_cls: ClassVar[type[AttentionImpl]] = AttentionImpl

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """One layer's cache: ``[0]`` keys, ``[1]`` values, each ``[num_blocks, block_size, nkv, head_size]``."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def get_builder_cls(cls) -> type[AttentionMetadataBuilder]:
        return cls.builder_cls

    @classmethod
    def get_impl_cls(cls) -> type[AttentionImpl]:
        return cls.impl_cls


def refuse_sinks(backend_name: str, sinks: torch.Tensor | None) -> None:
    """Raise for a layer with attention sinks on a backend that cannot apply them (instead of silently
    attending without them, which would change every output of the model)."""
    if sinks is not None:
        raise ValueError(
            f"attention backend '{backend_name}' does not support attention sinks (gpt-oss); "
            "use --attention-backend triton or torch."
        )


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size] (may be padded beyond slot_mapping)
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_slots] int64, -1 skipped
) -> None:
    """Write this step's new keys/values into the paged cache through the IR op ``reshape_and_cache``."""
    num_slots = slot_mapping.shape[0]
    ops.reshape_and_cache(key[:num_slots], value[:num_slots], kv_cache[0], kv_cache[1], slot_mapping)
