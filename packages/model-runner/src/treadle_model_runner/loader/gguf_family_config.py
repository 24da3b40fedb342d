"""The config.json fields particular to one GGUF family, on top of the Llama-shaped ones gguf_config.py writes.

Theory: llama.cpp's converter (convert_hf_to_gguf.py) writes a family's extra hyperparameters as ``<arch>.*``
metadata; what it leaves out, llama.cpp's loader (llama-model.cpp, its per-architecture hparams) fixes or
derives. We read the same keys and assume the same fallbacks, so the HF model behaves as llama.cpp runs the file:

- Gemma 3: ``attention.sliding_window`` is written unless every layer is global; llama.cpp then makes every 6th
  layer global (5, 11, ...) and the others sliding (``set_swa_pattern(6)``; a file carrying
  ``attention.sliding_window_pattern``, a period or a per-layer list, overrides it). Global layers use
  ``rope.freq_base`` and the file's rope scaling (linear for 4B and up), sliding layers ``rope.freq_base_swa``
  (written by newer converters; llama.cpp's fixed value is 10000), unscaled. ``final_logit_softcapping`` when
  written, no attention softcapping. The attention scale is not written: llama.cpp derives
  1/sqrt(hidden / heads) for the 27B (62 layers) and 1/sqrt(head_dim) otherwise, which is HF's
  ``query_pre_attn_scalar`` of every Gemma 3 release.
- Gemma 2: layers alternate sliding / global, layer 0 sliding (``set_swa_pattern(2)``), window
  ``attention.sliding_window`` (default 4096); ``attn_logit_softcapping`` and ``final_logit_softcapping``
  (defaults 50 and 30); the attention scale as Gemma 3, the 27B having 46 layers. Both Gemmas: GELU (tanh).
- Phi-3: ``rope.dimension_count`` is the rotated dims per head (partial_rotary_factor * head_dim, head_dim being
  hidden / heads: no ``attention.key_length``); ``rope.scaling.original_context_length`` is always written; a
  model with longrope scaling has the tensors ``rope_factors_long`` / ``rope_factors_short`` and
  ``rope.scaling.attn_factor`` (newer converters add ``rope.scaling.type`` = "longrope");
  ``attention.sliding_window`` (0: none; llama.cpp's runtime ignores it, HF's Phi-3 honors it, as we do).
- Qwen2-MoE: ``expert_count``, ``expert_used_count``, ``expert_feed_forward_length`` and
  ``expert_shared_feed_forward_length``, falling back as llama.cpp does to feed_forward_length / experts used
  and to feed_forward_length; the top-k weights are not renormalized (llama.cpp's graph; HF's default); every
  layer is sparse.
- OLMo 2: Llama's keys only. ``attention.sliding_window`` marks an OLMo 3 file, which treadle does not run.
- Granite: ``attention.scale``, ``embedding_scale``, ``residual_scale`` and ``logit_scale`` are HF's
  attention_multiplier, embedding_multiplier, residual_multiplier and logits_scaling (logits are divided by it).
  llama.cpp requires all four; absent, we take the values that change nothing (attention: head_dim^-0.5).

Invariants: every function only adds or replaces fields of the config dict it is given; a file whose
metadata treadle cannot honor raises ValueError naming the file and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from treadle_model_runner.loader.gguf_weights import dequantize_tensor, gguf_value

Meta = Callable[..., Any]  # meta(key[, default]) -> the file's `<arch>.<key>` value; no default: required
_REQUIRED = object()


def _layer_types(num_layers: int, pattern: Any) -> list[str]:
    """HF layer_types from llama.cpp's sliding window pattern: a period n (layer i global when (i + 1) % n == 0)
    or one bool per layer (True: sliding)."""
    if isinstance(pattern, list):
        return ["sliding_attention" if bool(s) else "full_attention" for s in pattern[:num_layers]]
    period = int(pattern)
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]


def _gemma(arch: str, reader: Any, meta: Meta, config: dict[str, Any]) -> None:
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    is_27b = layers == (62 if arch == "gemma3" else 46)
    config["query_pre_attn_scalar"] = config["hidden_size"] // heads if is_27b else config["head_dim"]
    config["hidden_activation"] = config["hidden_act"] = "gelu_pytorch_tanh"
    if arch == "gemma2":
        config.update(
            layer_types=_layer_types(layers, 2),
            sliding_window=int(meta("attention.sliding_window", 4096)),
            attn_logit_softcapping=float(meta("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(meta("final_logit_softcapping", 30.0)),
        )
        return
    window = int(meta("attention.sliding_window", 0) or 0)
    pattern = meta("attention.sliding_window_pattern", 6)
    full = {
        "rope_type": "default",
        "rope_theta": config.pop("rope_theta"),
        **(config.pop("rope_scaling") or {}),
    }
    sliding = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base_swa", 10000.0))}
    cap = meta("final_logit_softcapping", None)
    config.update(
        layer_types=_layer_types(layers, pattern) if window else ["full_attention"] * layers,
        sliding_window=window or None,
        rope_parameters={"full_attention": full, "sliding_attention": sliding},
        final_logit_softcapping=float(cap) if cap else None,
        attn_logit_softcapping=None,
    )


def _phi3(reader: Any, meta: Meta, config: dict[str, Any]) -> None:
    path = reader.data.filename
    head_dim = int(meta("attention.key_length", config["hidden_size"] // config["num_attention_heads"]))
    rotary_dim = int(meta("rope.dimension_count", head_dim))
    original = meta("rope.scaling.original_context_length", None)
    rope: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": config.pop("rope_theta"),
        "partial_rotary_factor": rotary_dim / head_dim,
    }
    factors = {
        t.name: t
        for t in reader.tensors
        if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")
    }
    if factors:
        if len(factors) != 2 or original is None:
            raise ValueError(
                f"GGUF file {path} has longrope factors {sorted(factors)} without both tensors and "
                "phi3.rope.scaling.original_context_length"
            )
        long, short = (
            dequantize_tensor(factors[f"rope_factors_{k}.weight"]).reshape(-1) for k in ("long", "short")
        )
        rope.update(rope_type="longrope", long_factor=long.tolist(), short_factor=short.tolist())
        rope["original_max_position_embeddings"] = int(original)
        if (attn_factor := meta("rope.scaling.attn_factor", None)) is not None:
            rope["attention_factor"] = float(attn_factor)
    config.pop("rope_scaling")
    config.update(
        head_dim=head_dim,
        rope_parameters=rope,
        sliding_window=int(meta("attention.sliding_window", 0)) or None,
    )
    if original is not None:
        config["original_max_position_embeddings"] = int(original)


def _granite(reader: Any, meta: Meta, config: dict[str, Any]) -> None:
    config.update(
        attention_multiplier=float(meta("attention.scale", config["head_dim"] ** -0.5)),
        embedding_multiplier=float(meta("embedding_scale", 1.0)),
        residual_multiplier=float(meta("residual_scale", 1.0)),
        logits_scaling=float(meta("logit_scale", 1.0)),
    )


def _smollm3(reader: Any, meta: Meta, config: dict[str, Any]) -> None:
    # which layers are NoPE is not in the file: llama.cpp fixes every 4th (its n_no_rope_layer_step), as SmolLM3-3B
    # has them and transformers derives them from this interval
    config.update(
        no_rope_layer_interval=4, no_rope_layers=None, use_sliding_window=False, sliding_window=None
    )


def _olmo2(reader: Any, meta: Meta, config: dict[str, Any]) -> None:
    if meta("attention.sliding_window", None):
        raise ValueError(
            f"GGUF file {reader.data.filename} sets olmo2.attention.sliding_window: an OLMo 3 model, which "
            "treadle does not run (OLMo 2 has no sliding window)"
        )


def _qwen_no_sliding_window(config: dict[str, Any]) -> None:
    config.update(
        use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"]
    )


def _moe(model_type: str, meta: Meta, config: dict[str, Any]) -> None:
    """The experts' part of config.json (llama.cpp's `expert_count`, `expert_used_count`, ...)."""
    if model_type == "mixtral":
        config.update(
            num_local_experts=int(meta("expert_count")),
            num_experts_per_tok=int(meta("expert_used_count")),
            sliding_window=None,
        )
        return
    used = int(meta("expert_used_count"))
    config.update(
        num_experts=int(meta("expert_count")),
        num_experts_per_tok=used,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    if model_type == "qwen3_moe":
        config.update(
            moe_intermediate_size=int(meta("expert_feed_forward_length")),
            norm_topk_prob=bool(meta("expert_weights_norm", True)),
        )
        return
    dense = config["intermediate_size"]
    config.update(
        moe_intermediate_size=int(meta("expert_feed_forward_length", dense // used)),
        shared_expert_intermediate_size=int(meta("expert_shared_feed_forward_length", dense)),
        norm_topk_prob=bool(meta("expert_weights_norm", False)),
        # biases on q, k and v only (HF's qkv_bias); attention_bias would add one to o_proj
        qkv_bias=config["attention_bias"],
        attention_bias=False,
    )


def apply_family_config(reader: Any, arch: str, model_type: str, config: dict[str, Any]) -> None:
    """Add the fields of the file's family (module docstring) to ``config``, in place."""

    def meta(key: str, default: Any = _REQUIRED) -> Any:
        if default is _REQUIRED:
            return gguf_value(reader, f"{arch}.{key}")
        return gguf_value(reader, f"{arch}.{key}", default)

    if arch in ("qwen2", "qwen3", "qwen3moe", "qwen2moe"):
        _qwen_no_sliding_window(config)
    if model_type in ("mixtral", "qwen3_moe", "qwen2_moe"):
        _moe(model_type, meta, config)
    if arch in ("gemma2", "gemma3"):
        _gemma(arch, reader, meta, config)
    elif family := _FAMILIES.get(arch):
        family(reader, meta, config)


_FAMILIES: dict[str, Callable[[Any, Meta, dict[str, Any]], None]] = {
    "phi3": _phi3,
    "granite": _granite,
    "olmo2": _olmo2,
    "smollm3": _smollm3,
}
