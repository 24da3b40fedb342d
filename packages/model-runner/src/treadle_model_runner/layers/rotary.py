"""Rotary position embedding: a precomputed cos/sin table and the IR op that rotates q and k with it.

Theory. Head dims come in pairs (i, i + rot_dim/2) (the "neox" layout HF Llama uses); the pair at position p
is rotated by angle p * inv_freq[i], inv_freq[i] = base^(-2i / rot_dim). `cos_sin_cache[p]` holds
[cos(p * inv_freq), sin(p * inv_freq)] (each rot_dim/2 wide), computed once in fp32 and stored in the model
dtype. Partial rotary (rot_dim < head_size) rotates only the first rot_dim dims of each head.

Scaling: "default"; "linear" (inv_freq / factor); "llama3" (low frequencies divided by `factor`, high ones kept, a
smooth blend between `original_max_position_embeddings / low_freq_factor` and `/ high_freq_factor` wavelengths);
"yarn" (YaRN, arXiv 2309.00071: dims that turn fewer than `beta_slow` times over the original context
`original_max_position_embeddings` are interpolated (inv_freq / factor), dims that turn more than `beta_fast` times
are kept, a linear ramp between; cos/sin multiplied by `attention_factor`, by default 0.1 ln(factor) + 1, or with
`mscale` and `mscale_all_dim` the ratio of that formula at the two); "longrope" (Phi-3/3.5/4-mini: inv_freq[i] /
ext[i] with ext one factor per frequency, and cos/sin multiplied by an attention factor, sqrt(1 + ln(s) /
ln(original_max_position_embeddings)) for s = max_position_embeddings / original_max_position_embeddings > 1 unless
the config gives `attention_factor`).
Other rope types raise ValueError naming the supported ones.

longrope chooses between `short_factor` and `long_factor` once, for the whole table: `long_factor` when the
engine's max_model_len (`max_position`) exceeds original_max_position_embeddings, else `short_factor` (vLLM's rule).
transformers instead chooses per forward call, by the longest position in it: it matches ours wherever every call
stays on one side of that length (all our parity tests), and differs for a sequence that crosses it, whose early
keys stay cached at the short factors while later queries use the long ones. One table keeps every cached key and
every query on the same frequencies, and is all a paged cache shared across chunked prefills can hold.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from treadle_ir import ops
from treadle_kernels.attention import Rope

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


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
    if params["rope_type"] == "longrope":  # Phi-3 configs keep the lengths beside the rope dict
        original = params.get("original_max_position_embeddings")
        original = original or getattr(config, "original_max_position_embeddings", None)
        if not original:
            raise ValueError(
                "rope_type 'longrope' needs original_max_position_embeddings (the pretraining context length) in "
                "config.json, at the top level or in rope_scaling"
            )
        params["original_max_position_embeddings"] = original
        params.setdefault("factor", config.max_position_embeddings / original)
    if params["rope_type"] == "yarn":
        # as transformers reads it: a top-level original length wins, else the rope dict's, else
        # max_position_embeddings; no factor means their ratio
        original = getattr(config, "original_max_position_embeddings", None)
        original = original or params.get("original_max_position_embeddings")
        original = original or config.max_position_embeddings
        params["original_max_position_embeddings"] = int(original)
        if params.get("factor") is None:
            params["factor"] = config.max_position_embeddings / original
    return params


def _longrope(rot_dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor) of a longrope table serving positions below `max_position`."""
    original = int(params["original_max_position_embeddings"])
    which = "long_factor" if max_position > original else "short_factor"
    logger.info(
        "longrope: %s (max_model_len %d, original_max_position_embeddings %d)", which, max_position, original
    )
    ext = torch.tensor(params[which], dtype=torch.float32)
    if ext.shape != (rot_dim // 2,):
        raise ValueError(
            f"rope {which} has {ext.numel()} values; the rotary dim {rot_dim} needs {rot_dim // 2} (one per "
            "frequency): config.json's rope_scaling does not match its head_dim and partial_rotary_factor"
        )
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float32) / rot_dim
    inv_freq = 1.0 / (ext * float(params["rope_theta"]) ** exponents)
    factor, attention_factor = float(params["factor"]), params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(rot_dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor) of YaRN: each frequency blends interpolation (inv_freq / factor) and the original
    by a ramp over the dims, from the one turning `beta_fast` times over the original context to `beta_slow`."""
    base, factor = float(params["rope_theta"]), float(params["factor"])
    original = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    # the (fractional) dim whose wavelength fits `turns` times in the original context
    def dim_turning(turns: float) -> float:
        return rot_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    # 1 keeps a dim's frequency, 0 interpolates it
    keep = 1 - ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # base^(2i / rot_dim): 1 / each dim's original frequency
    denom = base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(torch.float32) / rot_dim)
    inv_freq = 1.0 / (factor * denom) * (1 - keep) + 1.0 / denom * keep
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            numerator = _yarn_mscale(factor, float(mscale))
            attention_factor = numerator / _yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


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
        if params["rope_type"] == "longrope":
            inv_freq, attention_factor = _longrope(self.rotary_dim, params, max_position)
        elif params["rope_type"] == "yarn":
            inv_freq, attention_factor = _yarn(self.rotary_dim, params)
        else:
            inv_freq, attention_factor = _inv_freq(self.rotary_dim, params), 1.0
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor  # [max_position, rotary_dim]
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
