"""load_hf_config's cache: the second read of a config.json (no model config class imported) has the values of
the first (transformers' own class, defaults and rope standardisation included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from treadle_model_runner.loader import load_hf_config

READ_BY_MODELS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "attention_bias", "mlp_bias", "eos_token_id",
    "sliding_window", "layer_types", "partial_rotary_factor",
)  # fmt: skip

CONFIGS = [
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
     "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "rope_theta": 5e5,
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
    {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
     "vocab_size": 200, "tie_word_embeddings": True},
]  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["model_type"])
def test_cached_config_has_the_transformers_values(config, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    first = load_hf_config(model_dir)
    assert list((tmp_path / "cache" / "configs").glob("*.json")), "the first read stores no cache entry"
    second = load_hf_config(model_dir)
    assert type(second) is not type(first), "the second read did not come from the cache"
    for name in READ_BY_MODELS:
        assert getattr(second, name, None) == getattr(first, name, None), name

    config["hidden_size"] = 128  # another config.json: another entry, read the slow way
    (model_dir / "config.json").write_text(json.dumps(config))
    assert type(load_hf_config(model_dir)) is type(first)
    assert load_hf_config(model_dir).hidden_size == 128


def test_config_with_attribute_aliases_is_not_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4}))
    first, second = load_hf_config(tmp_path), load_hf_config(tmp_path)
    assert type(second) is type(first) and second.num_experts == 4  # the alias of num_local_experts
    assert not list((tmp_path / "cache").glob("configs/*.json"))
