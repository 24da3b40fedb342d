"""A model config read straight from config.json, without importing transformers, for the common dense families.

Why: importing transformers' config machinery takes ~2 s with warm disks. On a fresh machine it took 11.7 s of a
35 s cold start (H200, benchmarks/results/gpu-e2e-h200-6f7b0b9/). The engine only reads plain fields, so for the
families below (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, gpt-oss) it reads config.json itself.

Invariant: a `LightConfig` answers every field the model code reads exactly as transformers' class would. To
keep that true it is used only when config.json spells out each field whose transformers default differs
between families or is derived. Those fields are `_REQUIRED`. Everything else defaults the same way in every
listed family (`_DEFAULTS`) or is the family's own (`_MOE_DEFAULTS`). Any config.json outside that, such as another
model_type, a sliding window switched on through `use_sliding_window`, per-layer `layer_types` outside gpt-oss (whose
alternation transformers derives the same way when absent), a gpt-oss file without its rope dict (transformers puts
its default YaRN there), or a missing required field, returns None, and the caller uses transformers.
`test_light_config.py` checks the fields against transformers' classes on real and minimal configs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LightConfig", "light_config"]

_COMMON_REQUIRED = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
)
_REQUIRED = {
    "llama": (*_COMMON_REQUIRED, "eos_token_id"),
    "mistral": (*_COMMON_REQUIRED, "eos_token_id", "sliding_window"),
    "qwen2": _COMMON_REQUIRED,
    "qwen3": (*_COMMON_REQUIRED, "head_dim"),
    "qwen3_moe": (
        *_COMMON_REQUIRED,
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
    ),
    "mixtral": (*_COMMON_REQUIRED, "eos_token_id", "num_local_experts", "num_experts_per_tok"),
    # transformers' gpt_oss defaults head_dim to 64 whatever the widths: spelled out
    "gpt_oss": (*_COMMON_REQUIRED, "head_dim", "num_local_experts", "num_experts_per_tok"),
}
_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "head_dim": None,
    "sliding_window": None,
}
_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"decoder_sparse_step": 1, "mlp_only_layers": []},
    "gpt_oss": {"attention_bias": True, "sliding_window": 128, "swiglu_alpha": 1.702, "swiglu_limit": 7.0},
}


class LightConfig:
    """config.json's fields as attributes (plus `_DEFAULTS`); `to_dict()` gives them back."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"LightConfig({self.__dict__.get('model_type')!r}, {len(self.__dict__)} fields)"


def light_config(raw: dict[str, Any]) -> LightConfig | None:
    """The config for a config.json dict when it is one of the families above and complete, else None."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in _REQUIRED:
        return None
    # every required field present; only sliding_window may be null
    if any(key not in raw or (raw[key] is None and key != "sliding_window") for key in _REQUIRED[model_type]):
        return None
    if "rope_theta" not in raw and not isinstance(raw.get("rope_parameters"), dict):
        return None  # transformers' default theta differs by family (Mixtral 1e6)
    if model_type == "gpt_oss" and not isinstance(
        raw.get("rope_scaling") or raw.get("rope_parameters"), dict
    ):
        return None  # transformers' gpt_oss puts its default YaRN in place of a missing one
    if raw.get("use_sliding_window") or (raw.get("layer_types") is not None and model_type != "gpt_oss"):
        return None  # per-layer windows: transformers derives layer_types; leave that to it
    values = {**_DEFAULTS, **_MOE_DEFAULTS.get(model_type, {}), **raw}
    layer_types = values.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) != values["num_hidden_layers"]:
        return None  # transformers names the mismatch
    if model_type == "gpt_oss" and layer_types is None:  # as transformers derives them
        values["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(int(values["num_hidden_layers"]))
        ]
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        values["sliding_window"] = None  # transformers keeps it only with use_sliding_window
    if model_type in ("mixtral", "qwen3_moe", "gpt_oss"):  # attribute_map: num_experts <-> num_local_experts
        experts = values.get("num_local_experts", values.get("num_experts"))
        values["num_local_experts"] = values["num_experts"] = experts
    return LightConfig(values)
