"""Rotary position embedding: a precomputed cos/sin table and the IR op that rotates q and k with it.

Theory. Head dims come in pairs (i, i + rot_dim/2) (the "neox" layout HF Llama uses); the pair at position p
is rotated by angle p * inv_freq[i], inv_freq[i] = base^(-2i / rot_dim). `cos_sin_cache[p]` holds
[cos(p * inv_freq), sin(p * inv_freq)] (each rot_dim/2 wide), computed once in fp32 and stored in the model
dtype. Partial rotary (rot_dim < head_size) rotates only the first rot_dim dims of each head.

Scaling: "default"; "linear" (inv_freq / factor); "llama3" (low frequencies divided by `factor`, high ones kept,
a smooth blend between `original_max_position_embeddings / low_freq_factor` and `/ high_freq_factor`
wavelengths). Other rope types raise ValueError naming the supported ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from treadle_ir import ops
from treadle_kernels.attention import Rope

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameters of one layer type, from a transformers 5 `rope_parameters` dict or older fields."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if not isinstance(params, dict) or "rope_theta" not in params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    return params


def _inv_freq(rot_dim: int, params: dict[str, Any]) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float32) / rot_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, blended, scaled)
    raise ValueError(
        f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}. "
        "Use a model whose config.json names one of these."
    )


class RotaryEmbedding(nn.Module):
    cos_sin_cache: torch.Tensor  # a buffer [max_position, rotary_dim]

    def __init__(
        self, head_size: int, max_position: int, params: dict[str, Any], is_neox: bool = True
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = int(head_size * float(params.get("partial_rotary_factor", 1.0)))
        self.is_neox = is_neox
        inv_freq = _inv_freq(self.rotary_dim, params)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, rotary_dim]
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_dtype()), persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; query [T, nh * head_size]; key [T, nkv * head_size]."""
        return ops.rotary_embedding(positions, query, key, self.head_size, self.cos_sin_cache, self.is_neox)

    def rope(self, positions: torch.Tensor) -> Rope:
        """This embedding at these positions, for an attention backend to apply (``Attention(..., rope=)``)."""
        return Rope(positions, self.cos_sin_cache, self.is_neox)

    def rotate_(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
        """Rotate in place; query/key may be strided views (slices of a fused qkv buffer), no copies made."""
        ops.rotary_embedding_(positions, query, key, self.head_size, self.cos_sin_cache, self.is_neox)
