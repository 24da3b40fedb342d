"""Triton providers for ``rotary_embedding`` (functional) and ``rotary_embedding_`` (in place).

Query/key may be [T, heads * head_size] or [T, heads, head_size] with unit-stride heads (token stride is
free, so column slices of a fused qkv buffer work in place). The functional form writes fresh outputs; when
``rot_dim < head_size`` it first copies the input so the pass-through dims are present, then rotates in place.
"""

from __future__ import annotations

import torch

from treadle_ir import ops

from .launch import launch
from .support import check_tensor, next_pow2, triton_supported

__all__ = ["register"]


def _head_strides(x: torch.Tensor, head_size: int) -> tuple[int, int, int]:
    """(num_heads, token stride, head stride) of x viewed as [T, heads, head_size]."""
    if x.dim() == 3:
        return x.shape[1], x.stride(0), x.stride(1)
    return x.shape[1] // head_size, x.stride(0), head_size


def _rotate(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    query_out: torch.Tensor,
    key_out: torch.Tensor,
    head_size: int,
    cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate query -> query_out and key -> key_out in one launch (outputs may alias the inputs)."""
    from . import rotary_kernels

    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    num_q, q_token_stride, q_head_stride = _head_strides(query, head_size)
    _, qo_token_stride, qo_head_stride = _head_strides(query_out, head_size)
    num_k, k_token_stride, k_head_stride = _head_strides(key, head_size)
    _, ko_token_stride, ko_head_stride = _head_strides(key_out, head_size)
    half_rot = cache.shape[-1] // 2
    q_block, k_block, half_block = next_pow2(num_q), next_pow2(num_k), next_pow2(half_rot)
    launch(
        rotary_kernels.rotary_qk_kernel, (num_tokens, 2),
        positions, query, q_token_stride, q_head_stride, query_out, qo_token_stride, qo_head_stride, num_q,
        key, k_token_stride, k_head_stride, key_out, ko_token_stride, ko_head_stride, num_k,
        cache, cache.stride(0), half_rot,
        IS_NEOX=is_neox, Q_HEADS_BLOCK=q_block, K_HEADS_BLOCK=k_block, HALF_BLOCK=half_block,
        num_warps=min(max(q_block * half_block // 256, 1), 8),
    )  # fmt: skip


def _fresh(x: torch.Tensor, rot_dim: int, head_size: int) -> torch.Tensor:
    return (
        x.clone(memory_format=torch.contiguous_format)
        if rot_dim < head_size
        else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    )


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rot_dim = cos_sin_cache.shape[-1]
    query_out, key_out = _fresh(query, rot_dim, head_size), _fresh(key, rot_dim, head_size)
    _rotate(positions, query, key, query_out, key_out, head_size, cos_sin_cache, is_neox)
    return query_out, key_out


def rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    _rotate(positions, query, key, query, key, head_size, cos_sin_cache, is_neox)


def _check(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> bool | str:
    for name, t in (("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        if (reason := check_tensor(t, name)) is not None:
            return reason
    if (reason := check_tensor(positions, "positions", frozenset({torch.int64, torch.int32}))) is not None:
        return reason
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > head_size:
        return f"rot_dim {rot_dim} must be even and <= head_size {head_size}"
    for name, t in (("query", query), ("key", key)):
        if t.shape[0] != positions.shape[0]:
            return f"{name} has {t.shape[0]} tokens, positions has {positions.shape[0]}"
        if t.dim() == 3 and (t.shape[2] != head_size or t.stride(1) != head_size):
            return f"{name} [T, heads, head_size] must have contiguous heads of size {head_size}"
        if t.dim() == 2 and t.shape[1] % head_size:
            return f"{name} width {t.shape[1]} is not a multiple of head_size {head_size}"
        if t.dim() not in (2, 3):
            return f"{name} must be 2-D or 3-D, got {t.dim()}-D"
    return True


def register(provider: str = "triton") -> None:
    """Register the Triton rotary providers under ``provider``."""
    for ir_op, impl in ((ops.rotary_embedding, rotary_embedding), (ops.rotary_embedding_, rotary_embedding_)):
        ir_op.register_impl(provider, supported=triton_supported, supports_args=_check, batch_invariant=True)(
            impl
        )
