"""SmolLM3 (Llama with NoPE layers) against HF transformers, on tiny random configs (CPU, fp32).

- Parity, model_parity's two checks, with `no_rope_layers` [1, 1, 0, 1] (RoPE and NoPE layers; tied embeddings,
  attention and MLP biases), and with a sliding window short enough to matter on the NoPE layers, as transformers
  makes them under `use_sliding_window`: a mixed step's per-position logits within 1e-4 of HF, greedy 32-token
  continuations equal to HF `generate`.
- The NoPE layers: transformers' default from `no_rope_layer_interval`, and a list shorter than the layers refused.
- The Triton backend under the interpreter (test_runner_triton_interpreter's script): the same hidden states and
  tokens as the torch backend while the fused rope + decode kernel serves the RoPE layers' decodes, and every call
  of the NoPE layer reaches its attention without a rope (the backend's plain path).
- Dummy weights (load_format='dummy') build and run the family.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch
from test_models import COMMON
from test_runner_fakes import FakeScheduler, make_runner, perturb_, run_interpreted
from test_runner_triton_interpreter import SCRIPT

from treadle_model_runner.loader import make_dummy_model_dir
from treadle_model_runner.models import get_model_class
from treadle_model_runner.models.smollm3 import SmolLM3ForCausalLM

# layer 2 is NoPE
ROPE_FLAGS = [1, 1, 0, 1]
CONFIGS: dict[str, dict[str, Any]] = {
    "nope": dict(attention_bias=True, mlp_bias=True),
    # the NoPE layers (1 and 3) slide over 6 tokens, the RoPE layers attend to everything
    "nope_sliding": dict(no_rope_layers=[1, 0, 1, 0], use_sliding_window=True, sliding_window=6),
}


def _config(name: str) -> Any:
    kwargs = {**COMMON, "num_hidden_layers": 4, "no_rope_layers": ROPE_FLAGS, **CONFIGS[name]}
    return tf.SmolLM3Config(**kwargs)


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    config = _config(request.param)
    # SmolLM3's default, as SmolLM3-3B has it
    assert config.tie_word_embeddings
    if request.param == "nope_sliding":
        # the premise: transformers made the NoPE layers sliding
        assert config.layer_types == ["full_attention", "sliding_attention"] * 2
    torch.manual_seed(0)
    hf = tf.SmolLM3ForCausalLM(config).eval()
    perturb_(hf, seed=1, std=0.15)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def test_mixed_batch_logits_match_hf(tiny: tuple[Any, Path]) -> None:
    hf, path = tiny
    check_mixed_batch(hf, path, COMMON["vocab_size"])


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path]) -> None:
    hf, path = tiny
    check_greedy(hf, path, COMMON["vocab_size"])


def test_registry_and_nope_layers() -> None:
    config = _config("nope")
    assert get_model_class(config) is SmolLM3ForCausalLM
    model = SmolLM3ForCausalLM(config)
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [True, True, False, True]
    # transformers' default: a NoPE layer every no_rope_layer_interval layers
    derived = tf.SmolLM3Config(**{**COMMON, "num_hidden_layers": 8}, no_rope_layer_interval=4)
    assert SmolLM3ForCausalLM.nope_layers(derived) == {3, 7}
    derived.no_rope_layers = None
    assert SmolLM3ForCausalLM.nope_layers(derived) == {3, 7}
    derived.no_rope_layers = [1, 1, 0]
    with pytest.raises(ValueError, match=r"no_rope_layers has 3 entries but the model has 8 layers"):
        SmolLM3ForCausalLM(derived)


# which attention layers were handed a rope, over both backends' runs of test_runner_triton_interpreter's SCRIPT
RECORD_ROPES = textwrap.dedent(
    """
    from treadle_model_runner.layers.attention import Attention

    ropes = {}
    attend = Attention.attend

    def recording(self, query, key, value, rope, output):
        ropes.setdefault(self.layer_idx, set()).add(rope is not None)
        return attend(self, query, key, value, rope, output)

    Attention.attend = recording
    """
)
CHECK_ROPES = "assert ropes == {0: {True}, 1: {True}, 2: {False}, 3: {True}}, ropes\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suites cover the real kernels")
def test_triton_interpreter_matches_torch_backend(tmp_path: Path) -> None:
    config = tf.SmolLM3Config(
        vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, no_rope_layers=ROPE_FLAGS,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = tf.SmolLM3ForCausalLM(config).eval()
    perturb_(hf, seed=4, std=0.15)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "fused decode calls" in run_interpreted(RECORD_ROPES + SCRIPT + CHECK_ROPES, str(tmp_path))


def test_dummy_weights_generate(tmp_path: Path) -> None:
    runner = make_runner(make_dummy_model_dir(_config("nope"), tmp_path), load_format="dummy")
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8
