"""Rotary position embedding (RoPE) applied to query and key, neox or gpt-j layout, partial rotary dims.

Inputs: positions [T] int64; query [T, num_heads * head_size] (or [T, num_heads, head_size]); key likewise
with num_kv_heads; cos_sin_cache [max_position, rot_dim] holding cos in the first rot_dim/2 columns and sin
in the second. Only the first ``rot_dim`` dims of each head rotate; the rest pass through unchanged.

Layouts: neox pairs dim ``i`` with ``i + rot_dim/2`` (rotate-half); gpt-j pairs ``2i`` with ``2i + 1``.
For a pair (x1, x2) and angle index i: ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin``, computed in
fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from ..op import op

__all__ = ["rotary_embedding", "rotary_embedding_"]


def _example(device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    num_tokens, head_size = 8, 128
    positions = torch.arange(num_tokens, device=device)
    query = torch.randn(num_tokens, 32 * head_size, device=device, dtype=dtype)  # [T, nh * head_size]
    key = torch.randn(num_tokens, 8 * head_size, device=device, dtype=dtype)  # [T, nkv * head_size]
    cache = torch.randn(4096, head_size, device=device, dtype=torch.float32)  # [max_pos, rot_dim]
    return positions, query, key, head_size, cache, True


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int, is_neox: bool
) -> torch.Tensor:
    """Rotated copy of x [T, ...]: cos/sin [T, rot_dim/2] fp32."""
    heads = x.unflatten(-1, (-1, head_size)) if x.dim() == 2 else x  # [T, heads, head_size], also for T = 0
    rot_dim = cos.shape[-1] * 2
    rot = heads[..., :rot_dim].float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = rot[..., : rot_dim // 2], rot[..., rot_dim // 2 :]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = torch.cat((rotated.to(x.dtype), heads[..., rot_dim:]), dim=-1)
    return out.reshape(x.shape)


def _cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin_cache.index_select(0, positions).float()  # [T, rot_dim]
    half = cos_sin.shape[-1] // 2
    return cos_sin[:, :half], cos_sin[:, half:]


@op(example=_example)
def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return rotated copies ``(query, key)``; the inputs are not modified."""
    cos, sin = _cos_sin(positions, cos_sin_cache)
    return _rotate(query, cos, sin, head_size, is_neox), _rotate(key, cos, sin, head_size, is_neox)


@op(mutates_args=("query", "key"), example=_example)
def rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate ``query`` and ``key`` in place."""
    cos, sin = _cos_sin(positions, cos_sin_cache)
    query.copy_(_rotate(query, cos, sin, head_size, is_neox))
    key.copy_(_rotate(key, cos, sin, head_size, is_neox))
