"""Parity with HF transformers (CPU, fp32) on tiny random configs, driven through the ModelRunner.

For Llama (llama3 rope scaling), Mistral (sliding window), Qwen2 (qkv bias, tied embeddings), Qwen3 (q/k norm; also
with YaRN rope scaling), Gemma3 (sliding + global layers with a window small enough to matter, linear-scaled global
rope, softcapping), Gemma2 (the same with attention scores soft-capped), Phi-3 (stacked checkpoint projections;
longrope on its short and on its long factors, partial rotary), OLMo 2 (q/k norms over every head, norms after each
block) and Granite (embedding, residual and attention multipliers, logits scaling): one step mixing a fresh prefill, a
chunked prefill continuing on cached blocks and several decodes gives per-position logits within 1e-4 of HF, and
greedy 32-token continuations equal HF `generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch
from test_runner_fakes import FakeScheduler, make_runner, perturb_

from treadle_model_runner.loader import make_dummy_model_dir

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)


def _config(arch: str) -> Any:
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
        return tf.LlamaConfig(
            **COMMON, rope_parameters=rope, attention_bias=True, mlp_bias=True
        ), tf.LlamaForCausalLM
    if arch == "mistral":  # sliding window over every layer, short enough to matter
        return tf.MistralConfig(**COMMON, head_dim=16, sliding_window=7), tf.MistralForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True), tf.Qwen2ForCausalLM
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16), tf.Qwen3ForCausalLM
    if arch == "qwen3_yarn":
        # YaRN as Qwen's long-context recipe sets it; a base that spreads its ramp over the dims
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                "rope_theta": 100.0}  # fmt: skip
        return tf.Qwen3Config(**COMMON, head_dim=16, rope_parameters=rope), tf.Qwen3ForCausalLM
    if arch == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}  # fmt: skip
        config = tf.Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=20.0, rope_parameters=rope,
        )  # fmt: skip
        return config, tf.Gemma3ForCausalLM
    if arch in ("phi3", "phi4_mini"):
        return _phi3_config(arch), tf.Phi3ForCausalLM
    if arch == "olmo2":  # q/k norms over all heads, norms after each block; biases on q, k, v and o
        return tf.Olmo2Config(**COMMON, attention_bias=True), tf.Olmo2ForCausalLM
    if arch == "granite":  # every multiplier away from 1 (and the softmax scale from head_dim^-0.5), tied
        config = tf.GraniteConfig(**COMMON, embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.11,
                                  logits_scaling=2.5, tie_word_embeddings=True)  # fmt: skip
        return config, tf.GraniteForCausalLM
    if arch == "gemma2":  # attention scores soft-capped low enough to bite, one rope, no q/k norms
        config = tf.Gemma2Config(
            **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=20.0,
        )  # fmt: skip
        return config, tf.Gemma2ForCausalLM
    raise AssertionError(arch)


def _phi3_config(arch: str) -> Any:
    """phi3: longrope on its short factors (max_model_len 64 = original_max_position_embeddings: see
    RUNNER_KWARGS; every sequence is shorter, so HF picks them too), the default attention factor (max_position
    128 / 64), a sliding window over every layer. phi4_mini: partial rotary (0.75: 12 of 16 head dims), longrope
    on its long factors (original_max_position_embeddings 2: every call HF makes is longer) with an explicit
    attention factor, tied embeddings."""
    partial = 0.75 if arch == "phi4_mini" else 1.0
    pairs = int(16 * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.3 * i for i in range(pairs)], "long_factor": [1.5 + 2.0 * i for i in range(pairs)]}  # fmt: skip
    if arch == "phi3":
        return tf.Phi3Config(
            **COMMON, original_max_position_embeddings=64, sliding_window=7, rope_parameters=rope
        )
    rope["attention_factor"] = 1.2
    return tf.Phi3Config(**COMMON, original_max_position_embeddings=2, partial_rotary_factor=partial,
                         tie_word_embeddings=True, rope_parameters=rope)  # fmt: skip


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_yarn", "gemma3", "gemma2", "phi3", "phi4_mini", "olmo2",
         "granite"]  # fmt: skip
RUNNER_KWARGS: dict[str, dict[str, Any]] = {"phi3": {"max_model_len": 64}}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path, dict[str, Any]]:
    config, cls = _config(request.param)
    torch.manual_seed(ARCHS.index(request.param))
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path, RUNNER_KWARGS.get(request.param, {})


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path, dict[str, Any]]) -> None:
    hf, path, runner_kwargs = tiny
    check_mixed_batch(hf, path, 160, **runner_kwargs)


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path, dict[str, Any]]) -> None:
    hf, path, runner_kwargs = tiny
    check_greedy(hf, path, 160, **runner_kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_dummy_weights_generate(arch: str, tmp_path: Path) -> None:
    """load_format='dummy' (benchmarks: weights drawn from the config alone) builds and runs every family."""
    runner = make_runner(make_dummy_model_dir(_config(arch)[0], tmp_path), load_format="dummy")
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8
