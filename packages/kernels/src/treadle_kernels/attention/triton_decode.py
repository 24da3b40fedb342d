"""Host side of the fused decode attention (``triton_decode_kernel.py``): when it applies, and its launch.

It serves a step whose every request has one query token (``max_query_len == 1``; decode CUDA graphs) when the
batch is small (at most ``FUSED_MAX_PROGRAMS`` request x KV-head pairs: batch-1 decode, where the separate launches
cost more than the work), the rotation is the neox layout over the whole head (Llama, Qwen, Mistral), the head dim
is a power of two >= 32 and there is no logit soft-cap. Measured on an H200 (results/gpu-attention-h200-eb7d0f5):
one layer at batch 1 takes 7.7 us fused against 10.2 unfused (context 192), but 79 against 63 us at batch 32 and
346 against 257 at batch 64, context 4k (its key loop reads K in two rotary halves with two half-width dots), and
the 1000-prompt offline run gave 9,480 tok/s with it at every batch size against 9,749 without. Anything else
runs unfused: the rotary op, then the backend's usual forward. ``TREADLE_FUSED_DECODE_ATTENTION=0`` turns it off
(measurements against the unfused launches).

Tiles and the split count are the unified kernel's for a decode batch (``choose_launch_config``), so a graph
captured for a batch size keeps one split count as contexts grow. The split reduction's ticket counters come
from the metadata builder (allocated before any capture, zero between launches).
"""

from __future__ import annotations

import torch

from treadle_kernels import envs
from treadle_kernels.attention.backend import Rope
from treadle_kernels.attention.metadata import AttentionMetadata
from treadle_kernels.ops.launch import launch
from treadle_kernels.ops.support import pdl_enabled

# request x KV-head pairs up to which the fused kernel runs (batch 1 measured faster; batch 32 slower)
FUSED_MAX_PROGRAMS = 32
MAX_COUNTERS = 1024  # split-KV runs only while tokens x KV heads < 2 x SMs; more than any GPU has


def new_counters(device: torch.device) -> torch.Tensor:
    """Ticket counters for the split reduction (one per token x KV head), all zero."""
    return torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)


def fusable(
    rope: Rope,
    md: AttentionMetadata,
    head_size: int,
    logits_soft_cap: float | None,
    query: torch.Tensor,
    num_kv_heads: int,
    max_programs: int = FUSED_MAX_PROGRAMS,
) -> bool:
    """Whether the fused decode kernel serves this call (see the module docstring)."""
    return (
        md.max_query_len == 1
        and md.num_reqs * num_kv_heads <= max_programs
        and md.causal
        and rope.is_neox
        and rope.cos_sin_cache.shape[-1] == head_size
        and head_size >= 32
        and head_size & (head_size - 1) == 0
        and logits_soft_cap is None
        and query.shape[0] >= md.num_reqs
        and envs.FUSED_DECODE_ATTENTION()
    )


def fused_decode_attention(
    rope: Rope,
    query: torch.Tensor,  # [T, nh, d], unrotated
    key: torch.Tensor,  # [T, nkv, d], unrotated
    value: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, nkv, d]
    md: AttentionMetadata,
    output: torch.Tensor,  # [T, nh, d]
    scale: float,
    sliding_window: int | None,
    counters: torch.Tensor,
    num_splits: int,
    block_n: int,
    sinks: torch.Tensor | None = None,  # [nh] sink logits (gpt-oss), read as float32
) -> torch.Tensor:
    """Rotate, write the new K/V and attend, for one-token requests (token i is request i)."""
    from treadle_kernels.attention.triton_decode_kernel import decode_attention_kernel
    from treadle_kernels.ops.cache import fp8_max

    num_tokens = md.num_reqs  # padded decode graphs carry one-token dummy requests for their padding
    if num_tokens == 0:
        return output
    num_heads, head_dim = query.shape[1], query.shape[2]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, (
        "K and V caches must share strides"
    )
    if num_splits > 1 and num_tokens * num_kv_heads > counters.numel():
        num_splits = 1
    part_acc = part_m = part_l = output
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=query.device)  # fmt: skip
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    group = num_heads // num_kv_heads
    cos_sin = rope.cos_sin_cache
    pdl = pdl_enabled(query.device)
    # without sinks any tensor stands in for them: HAS_SINKS is False and the kernel never reads it
    sinks_arg = output if sinks is None else sinks
    launch(
        decode_attention_kernel, (num_tokens, num_kv_heads, num_splits),
        output, part_acc, part_m, part_l, counters, query, key, value, rope.positions, cos_sin,
        k_cache, v_cache, md.block_table, md.seq_lens, md.slot_mapping, sinks_arg, scale, sliding_window or 0,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        output.stride(0), output.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), md.block_table.stride(0),
        G=group, HALF=head_dim // 2, BLOCK_SIZE=block_size, BLOCK_M=max(16, 1 << (group - 1).bit_length()),
        BLOCK_N=block_n, NUM_SPLITS=num_splits, USE_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=query.device.type == "cpu", USE_PDL=pdl,
        FP8_MAX=fp8_max(k_cache.dtype), HAS_SINKS=sinks is not None,
        num_warps=4, num_stages=2 if query.device.type == "cuda" else 1, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return output
