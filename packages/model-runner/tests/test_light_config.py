"""The config read without transformers (`light_config`) answers every field the models read as transformers does.

Each case is a config.json as model authors write them: sometimes minimal, sometimes with keys transformers fills
in or rewrites (Qwen2's sliding_window without use_sliding_window, Llama 3.1 rope scaling, Mixtral's 1e6 theta).
Both configs go through the helpers the models use (head dim, per-layer sliding window, rope table, model class).
Cases transformers must handle return None: an unknown family, per-layer windows, a missing required field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig

from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.loader.light_config import light_config
from treadle_model_runner.loader.resolve import load_hf_config
from treadle_model_runner.models.llama import head_dim_of, sliding_window_of
from treadle_model_runner.models.registry import get_model_class

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "rms_norm_eps": 1e-5,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_type": "llama3",
}
# the released gpt-oss configs' rope_scaling (with rope_theta 150000)
GPT_OSS_ROPE = {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                "rope_type": "yarn", "truncate": False}  # fmt: skip
CASES: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "eos_token_id": 2,
              "rope_theta": 500000.0},
    "llama31": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "eos_token_id": [1, 2],
                "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE, "tie_word_embeddings": True,
                "head_dim": 32, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **SMALL, "eos_token_id": 2,
                "rope_theta": 10000.0, "sliding_window": 32},
    "mistral_no_window": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **SMALL,
                          "eos_token_id": 2, "rope_theta": 1e6, "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **SMALL, "rope_theta": 1e6,
              "sliding_window": 128, "use_sliding_window": False, "max_window_layers": 2, "eos_token_id": 7,
              "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **SMALL, "head_dim": 32,
              "rope_theta": 1e6, "sliding_window": None, "use_sliding_window": False, "max_window_layers": 3},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **SMALL, "head_dim": 16,
                  "rope_theta": 1e6, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1]},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **SMALL, "eos_token_id": 2,
                "rope_theta": 1e6, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "gpt_oss": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **SMALL, "head_dim": 16,
                "rope_theta": 150000, "rope_scaling": GPT_OSS_ROPE, "num_local_experts": 4, "num_experts_per_tok": 2,
                "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}},
    "gpt_oss_layer_types": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **SMALL, "head_dim": 16,
                            "rope_theta": 1e4, "rope_scaling": GPT_OSS_ROPE, "num_local_experts": 4,
                            "num_experts_per_tok": 2, "sliding_window": 8, "attention_bias": False,
                            "swiglu_limit": 5.0,
                            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
}  # fmt: skip
FALLBACK: dict[str, dict[str, Any]] = {
    "gemma3_text": {**CASES["llama"], "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]},
    "no_theta": {k: v for k, v in CASES["mixtral"].items() if k != "rope_theta"},
    "no_kv_heads": {k: v for k, v in CASES["llama"].items() if k != "num_key_value_heads"},
    "qwen2_window_on": {**CASES["qwen2"], "use_sliding_window": True},
    "mistral_window_unsaid": {k: v for k, v in CASES["mistral"].items() if k != "sliding_window"},
    "qwen3_no_head_dim": {k: v for k, v in CASES["qwen3"].items() if k != "head_dim"},
    # families the light path does not read (stacked checkpoints, longrope, other norms): transformers does
    "phi3": {**CASES["llama"], "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]},
    "olmo2": {**CASES["llama"], "model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]},
    "granite": {**CASES["llama"], "model_type": "granite", "architectures": ["GraniteForCausalLM"]},
    "qwen2_moe": {**CASES["qwen3_moe"], "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]},
    # gpt-oss without its rope dict gets transformers' default YaRN; without head_dim, transformers' 64
    "gpt_oss_no_rope_dict": {k: v for k, v in CASES["gpt_oss"].items() if k != "rope_scaling"},
    "gpt_oss_no_head_dim": {k: v for k, v in CASES["gpt_oss"].items() if k != "head_dim"},
    "gpt_oss_layer_types_miscounted": {**CASES["gpt_oss_layer_types"], "num_hidden_layers": 4},
}
FIELDS = (
    "architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "num_hidden_layers", "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act", "eos_token_id",
    "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
    "num_local_experts", "num_experts", "swiglu_alpha", "swiglu_limit",
)  # fmt: skip
FLAGS = ("attention_bias", "mlp_bias", "tie_word_embeddings")  # read as bool(getattr(config, name, False))


def _both(raw: dict[str, Any], tmp_path: Path) -> tuple[Any, Any]:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return light_config(raw), AutoConfig.from_pretrained(str(tmp_path), local_files_only=True)


@pytest.mark.parametrize("name", CASES)
def test_light_config_reads_what_transformers_reads(name: str, tmp_path: Path) -> None:
    light, hf = _both(CASES[name], tmp_path)
    assert light is not None, name
    for field in FIELDS:
        assert getattr(light, field, None) == getattr(hf, field, None), field
    for flag in FLAGS:
        assert bool(getattr(light, flag, False)) == bool(getattr(hf, flag, False)), flag
    head_dim = head_dim_of(hf)
    assert head_dim_of(light) == head_dim
    layers = range(hf.num_hidden_layers)
    assert [sliding_window_of(light, i) for i in layers] == [sliding_window_of(hf, i) for i in layers]
    tables = [RotaryEmbedding(head_dim, 128, rope_parameters(c)).cos_sin_cache for c in (light, hf)]
    torch.testing.assert_close(tables[0], tables[1], rtol=0, atol=0)
    assert get_model_class(light) is get_model_class(hf)


@pytest.mark.parametrize("name", FALLBACK)
def test_transformers_reads_what_light_config_cannot(name: str) -> None:
    assert light_config(FALLBACK[name]) is None


def test_load_hf_config_takes_the_light_path_only_when_it_applies(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CASES["llama31"]))
    assert type(load_hf_config(tmp_path)).__name__ == "LightConfig"
    (tmp_path / "config.json").write_text(json.dumps(FALLBACK["no_kv_heads"]))
    assert type(load_hf_config(tmp_path)).__name__ != "LightConfig"


BENCH_CONFIGS = Path(__file__).resolve().parents[3] / "benchmarks" / "configs"


@pytest.mark.skipif(not BENCH_CONFIGS.is_dir(), reason="the repository's benchmark configs are not here")
@pytest.mark.parametrize(
    "name", ["llama-3.1-8b", "llama-3.1-8b-awq", "qwen3-8b", "qwen3-0.6b", "qwen3-30b-a3b", "gpt-oss-20b"]
)
def test_light_config_on_the_benchmark_configs(name: str, tmp_path: Path) -> None:
    raw = json.loads((BENCH_CONFIGS / name / "config.json").read_text())
    CASES[f"bench:{name}"] = raw
    try:
        test_light_config_reads_what_transformers_reads(f"bench:{name}", tmp_path)
    finally:
        del CASES[f"bench:{name}"]
