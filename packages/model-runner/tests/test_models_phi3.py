"""Phi-3 specifics beyond the parity tests of test_models.py (CPU).

- The longrope table (Phi-4-mini's shape: 128-wide heads, partial rotary 0.75, 48 factors) equals transformers'
  Phi3RotaryEmbedding cos/sin, attention factor included: on the short factors for a server whose max_model_len is
  the original context (transformers: a sequence no longer than it), on the long ones past it.
- A factor list that does not match the rotary dim, and a stacked checkpoint tensor of the wrong shape, are refused
  by name.
- fp8 checkpoints (every format of fp8_checkpoints.py): the stacked qkv_proj / gate_up_proj hold the files' bytes
  and their one scale set, and a whole prefill's logits are within 1e-4 of the checkpoint reference. (A chunked
  prefill is not compared here: its attention sums in another order, and a last-bit difference in a projection's
  input can move an e4m3 rounding and its per-token scale, a 1e-2-sized change; test_quantization_fp8_checkpoint.py
  compares them for models where, at its seeds, none does.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_checkpoints import FORMATS, read_checkpoint, write_fp8_checkpoint
from fp8_reference import fp8_checkpoint_reference
from model_parity import hf_logits
from test_models import _config
from test_quantization_fp8_checkpoint import check_projections_hold_the_files
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.loader import iterate_weights
from treadle_model_runner.models import get_model_class

ORIGINAL = 256


def _phi4_mini_like(**rope_extra: Any) -> Any:
    pairs = 48  # 128 * 0.75 / 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, **rope_extra,
            "short_factor": [1.0 + 0.05 * i for i in range(pairs)], "long_factor": [1.0 + 0.5 * i for i in range(pairs)]}  # fmt: skip
    return tf.Phi3Config(
        hidden_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL,
        original_max_position_embeddings=ORIGINAL, partial_rotary_factor=0.75, rope_parameters=rope,
    )  # fmt: skip


@pytest.mark.parametrize(
    "max_model_len", [ORIGINAL, ORIGINAL + 1, 4 * ORIGINAL], ids=["short", "long", "long-max"]
)
def test_longrope_table_matches_transformers(max_model_len: int) -> None:
    config = _phi4_mini_like()
    ours = RotaryEmbedding(128, max_model_len, rope_parameters(config)).cos_sin_cache
    assert ours.shape == (max_model_len, 96)
    with torch.no_grad():  # transformers picks the factors by the longest position of the call
        cos, sin = Phi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(max_model_len)[None])
    assert Phi3RotaryEmbedding(config).attention_scaling > 1.05  # the premise: a factor that shows
    torch.testing.assert_close(ours[:, :48], cos[0, :, :48], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:, 48:], sin[0, :, :48], atol=1e-6, rtol=0)


def test_longrope_explicit_attention_factor() -> None:
    config = _phi4_mini_like(attention_factor=1.5)
    ours = RotaryEmbedding(128, ORIGINAL, rope_parameters(config)).cos_sin_cache
    assert float(ours[0, 0]) == pytest.approx(1.5)  # cos(0) * attention factor


def test_longrope_factors_must_match_the_rotary_dim() -> None:
    params = rope_parameters(_phi4_mini_like())
    with pytest.raises(ValueError, match=r"short_factor has 48 values; the rotary dim 128 needs 64"):
        RotaryEmbedding(128, ORIGINAL, {**params, "partial_rotary_factor": 1.0})


def _tiny_phi3() -> Any:
    config = tf.Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           eos_token_id=None, bos_token_id=None, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return tf.Phi3ForCausalLM(config).eval()


def test_stacked_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    hf = _tiny_phi3()
    state = dict(hf.state_dict())
    name = "model.layers.1.self_attn.qkv_proj.weight"
    state[name] = state[name][:-16]  # a checkpoint whose config.json says more key/value heads than it holds
    model = get_model_class(hf.config)(hf.config)
    with torch.no_grad(), pytest.raises(ValueError, match=r"qkv_proj\.weight.*\(112, 64\).*\(128, 64\)"):
        model.load_weights(state.items())


def test_stacked_checkpoint_loads_whole(tmp_path: Path) -> None:
    hf = _tiny_phi3()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model: Any = get_model_class(hf.config)(hf.config)
    with torch.no_grad():
        loaded = model.load_weights(iterate_weights(tmp_path, "safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight:v" in loaded
    assert "model.layers.0.mlp.gate_up_proj.weight:up" in loaded
    for i in range(2):
        ours, theirs = model.model.layers[i], hf.model.layers[i]
        torch.testing.assert_close(
            ours.self_attn.qkv_proj.weight, theirs.self_attn.qkv_proj.weight, atol=0, rtol=0
        )
        torch.testing.assert_close(
            ours.mlp.gate_up_proj.weight, theirs.mlp.gate_up_proj.weight, atol=0, rtol=0
        )


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_checkpoint_with_stacked_projections(fmt: str, tmp_path: Path) -> None:
    config, cls = _config("phi4_mini")
    torch.manual_seed(0)
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    write_fp8_checkpoint(hf, tmp_path, FORMATS[fmt])
    files = read_checkpoint(tmp_path)
    assert "model.layers.0.self_attn.qkv_proj.weight_scale" in files  # the premise: one scale set, stacked
    runner = make_runner(tmp_path)
    check_projections_hold_the_files(runner, files)
    prompt = torch.randint(1, 160, (23,), generator=torch.Generator().manual_seed(7)).tolist()
    sched = FakeScheduler(runner)
    sched.add("a", prompt, max_tokens=1)
    hidden = record_hidden(runner)
    sched.step({"a": len(prompt)})
    with torch.no_grad():
        logits = runner._require_model().compute_logits(hidden[0]).float()
    ref = hf_logits(fp8_checkpoint_reference(hf, files), prompt)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    assert float((logits - hf_logits(hf, prompt)).abs().max()) > 1e-2  # far from the unquantized model
