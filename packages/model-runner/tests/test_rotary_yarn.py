"""YaRN rope tables against transformers' own YaRN frequencies and attention factor (rope_type "yarn").

Each case builds an HF config, takes transformers' inverse frequencies and attention factor for it
(`ROPE_INIT_FUNCTIONS["yarn"]`), and compares cos(p * inv_freq) * factor, sin(...) * factor with treadle's table, which
reads the same config through `rope_parameters`. The cases span the YaRN fields models ship: Qwen's long-context
recipe, gpt-oss's untruncated ramp, DeepSeek's mscale pair, an explicit attention factor, partial rotary, a top-level
original length and a missing factor. The model-level parity (a Qwen3 with YaRN against HF) is in test_models.py;
the context length YaRN gives a model is checked last.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.runner.setup import resolve_max_model_len

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # (rope dict, other config fields)
    "qwen3_recipe": ({"factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
                     {"max_position_embeddings": 131072}),
    "gpt_oss": ({"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                 "original_max_position_embeddings": 4096}, {"max_position_embeddings": 131072, "head_dim": 64}),
    "deepseek_mscale": ({"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 24, "beta_slow": 2,
                         "original_max_position_embeddings": 4096, "rope_theta": 10000.0},
                        {"max_position_embeddings": 163840}),
    "attention_factor": ({"factor": 2.0, "attention_factor": 1.25, "original_max_position_embeddings": 2048,
                          "rope_theta": 10000.0}, {"max_position_embeddings": 4096}),
    "partial_rotary": ({"factor": 8.0, "original_max_position_embeddings": 1024, "rope_theta": 500000.0,
                        "partial_rotary_factor": 0.5}, {"max_position_embeddings": 8192}),
    # a top-level original length wins over the rope dict's (Phi-3 style)
    "top_level_original": ({"factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 4096},
                           {"max_position_embeddings": 8192, "original_max_position_embeddings": 2048}),
}  # fmt: skip


def _config(case: str) -> Any:
    rope, fields = CASES[case]
    fields = {"head_dim": 128, **fields}
    return tf.Qwen3Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                          rope_parameters={"rope_type": "yarn", **rope}, **fields)  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_yarn_table_matches_transformers(case: str) -> None:
    config = _config(case)
    length = 4096
    # ours first: transformers rewrites the config's rope dict in place (a top-level original length moves in)
    ours = RotaryEmbedding(config.head_dim, length, rope_parameters(config)).cos_sin_cache
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :].float()
    expected = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * factor
    assert ours.shape == expected.shape == (length, 2 * inv_freq.numel())
    assert factor != 1.0  # the premise: an attention factor that shows in the table
    torch.testing.assert_close(ours, expected, atol=2e-6, rtol=0)


def test_yarn_without_factor_takes_the_length_ratio() -> None:
    """No `factor`: max_position_embeddings / original_max_position_embeddings, as transformers computes it."""
    config = _config("qwen3_recipe")
    config.rope_parameters.pop("factor")
    params = rope_parameters(config)
    assert params["factor"] == pytest.approx(4.0)
    with_factor = RotaryEmbedding(128, 1024, rope_parameters(_config("qwen3_recipe"))).cos_sin_cache
    torch.testing.assert_close(RotaryEmbedding(128, 1024, params).cos_sin_cache, with_factor, atol=0, rtol=0)


def test_yarn_interpolates_only_the_slow_dims() -> None:
    """The premise of the cases: the fastest dims keep their frequency, the slowest are divided by the factor."""
    config = _config("qwen3_recipe")
    plain_params = rope_parameters(tf.Qwen3Config(head_dim=128, rope_theta=1e6))
    plain = RotaryEmbedding(128, 2, plain_params).cos_sin_cache
    yarn = RotaryEmbedding(128, 2, {**rope_parameters(config), "attention_factor": 1.0}).cos_sin_cache
    angle_plain = torch.atan2(plain[1, 64:], plain[1, :64])
    angle_yarn = torch.atan2(yarn[1, 64:], yarn[1, :64])
    torch.testing.assert_close(angle_yarn[:8], angle_plain[:8])
    torch.testing.assert_close(angle_yarn[-8:], angle_plain[-8:] / 4.0)


def test_yarn_context_is_the_original_length_times_the_factor() -> None:
    """Qwen3's recipe: YaRN x4 over 32,768 pretraining positions, max_position_embeddings left at 40,960. The
    context is 131,072 (vLLM's derivation), not 40,960; past it the error names the YaRN context."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    config = tf.Qwen3Config(head_dim=128, max_position_embeddings=40960, rope_parameters=rope)
    assert resolve_max_model_len(None, config) == 131072
    assert resolve_max_model_len(100000, config) == 100000
    with pytest.raises(ValueError, match=r"max_model_len \(131073\) .* YaRN context .* \(131072\)"):
        resolve_max_model_len(131073, config)
    assert resolve_max_model_len(None, tf.Qwen3Config(max_position_embeddings=40960)) == 40960


def test_linear_scaling_context_is_the_length_times_the_factor() -> None:
    """Linear rope scaling divides positions by the factor, so vLLM serves max_position_embeddings x factor; the
    error past it names that context."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config = tf.LlamaConfig(max_position_embeddings=4096, rope_parameters=rope)
    assert resolve_max_model_len(None, config) == 8192
    with pytest.raises(ValueError, match=r"max_model_len \(8193\) .* linear rope context .* \(8192\)"):
        resolve_max_model_len(8193, config)
