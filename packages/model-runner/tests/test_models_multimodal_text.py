"""Multimodal checkpoints served as their text model (loader/multimodal.py), against HF transformers on CPU, fp32.

Tiny random Gemma3ForConditionalGeneration (tied embeddings, sliding + global layers, scaled rope) and
Mistral3ForConditionalGeneration (its own lm_head, as Mistral Small 3.1 ships it) with tiny vision towers are saved
in both layouts found in the wild: transformers 4.x's (`language_model.model.*`, which transformers 5's
`save_pretrained` still writes) and transformers 5's module names (`model.language_model.*`, `lm_head.weight`,
`model.vision_tower.*`; written here by renaming the keys, as two shards, the vision tensors in a shard of their
own). Each loads as its text model only: a mixed batch (fresh prefill, chunked prefill on cached blocks, decodes)
gives HF's text-only logits (no pixel values) within 1e-4, greedy continuations equal HF `generate`, the model holds
exactly HF's language-model parameters, and no vision tensor is read. The config the engine sees is text_config's
(context length, vocabulary, eos ids from the top level, quantization_config carried).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_greedy, check_mixed_batch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_models import COMMON
from test_runner_fakes import FakeScheduler, make_runner, perturb_

from treadle_model_runner import ModelConfig
from treadle_model_runner.loader import iterate_weights, resolve_model
from treadle_model_runner.loader.mapped_file import MappedSafetensors
from treadle_model_runner.loader.multimodal import WRAPPERS
from treadle_model_runner.models import get_model_class
from treadle_model_runner.models.gemma3 import Gemma3ForCausalLM
from treadle_model_runner.models.llama import LlamaForCausalLM
from treadle_model_runner.runner.setup import eos_token_ids, resolve_max_model_len

VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
# transformers 4.x's names -> transformers 5's module names
TO_V5 = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _gemma3() -> tf.PreTrainedModel:
    """No final logit softcapping, as in Gemma 3's checkpoints: transformers' Gemma3ForConditionalGeneration does not
    apply text_config's (its Gemma3ForCausalLM and treadle do)."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}  # fmt: skip
    text = tf.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, rope_parameters=rope,
    )  # fmt: skip
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)  # fmt: skip
    config = tf.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    return tf.Gemma3ForConditionalGeneration(config)


def _mistral3() -> tf.PreTrainedModel:
    text = tf.MistralConfig(**COMMON, head_dim=16, sliding_window=None, rope_theta=1_000_000.0)
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    head_dim=16, image_size=28, patch_size=14)  # fmt: skip
    # Mistral Small 3.1's lm_head is its own tensor (transformers 5 would tie it under the top-level default)
    config = tf.Mistral3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), tie_word_embeddings=False
    )
    return tf.Mistral3ForConditionalGeneration(config)


BUILDERS = {"gemma3": _gemma3, "mistral3": _mistral3}


def _write_v5_layout(v4_dir: Path, out: Path) -> None:
    """`v4_dir`'s checkpoint under transformers 5's names, as two shards: language model, then vision."""
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(v4_dir / "model.safetensors")).items():
        for old, new in TO_V5:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        renamed[name] = tensor
    out.mkdir()
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, tensor in renamed.items():
        shards[sorted(shards)[name.startswith(VISION_PREFIXES)]][name] = tensor.contiguous()
    for file, part in shards.items():
        save_file(part, str(out / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in shards.items() for name in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text((v4_dir / "config.json").read_text())


@pytest.fixture(scope="module", params=[f"{arch}-{layout}" for arch in BUILDERS for layout in ("v4", "v5")])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, str]:
    """(HF model, checkpoint directory, architecture key) for one architecture in one layout."""
    arch, layout = request.param.split("-")
    torch.manual_seed(17)
    hf = BUILDERS[arch]().eval()
    perturb_(hf, seed=3, std=0.15)
    v4 = tmp_path_factory.mktemp(f"{arch}-v4")
    hf.save_pretrained(v4, safe_serialization=True)
    with safe_open(str(v4 / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    # the layout this test calls transformers 4.x's is what save_pretrained writes
    assert all(n.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")) for n in names)
    if layout == "v4":
        return hf, v4, arch
    v5 = tmp_path_factory.mktemp(f"{arch}-v5") / "checkpoint"
    _write_v5_layout(v4, v5)
    # transformers 5's layout is the HF model's own module names
    index = json.loads((v5 / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) <= set(hf.state_dict()), set(index["weight_map"]) - set(hf.state_dict())
    return hf, v5, arch


def test_mixed_batch_logits_match_hf_text_only(tiny: tuple[Any, Path, str]) -> None:
    hf, path, _ = tiny
    check_mixed_batch(hf, path, COMMON["vocab_size"])


def test_greedy_continuations_match_hf_generate(tiny: tuple[Any, Path, str]) -> None:
    hf, path, _ = tiny
    check_greedy(hf, path, COMMON["vocab_size"])


def test_only_the_language_model_is_loaded(
    tiny: tuple[Any, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model holds HF's parameters less the vision tower's and the projector's, and no vision tensor is read."""
    hf, path, arch = tiny
    read: list[str] = []
    view = MappedSafetensors.get

    def recording_get(self: MappedSafetensors, name: str) -> torch.Tensor | None:
        read.append(name)
        return view(self, name)

    monkeypatch.setattr(MappedSafetensors, "get", recording_get)
    model = make_runner(path)._require_model()
    assert read and not [n for n in read if n.startswith(VISION_PREFIXES)]
    expected_class = Gemma3ForCausalLM if arch == "gemma3" else LlamaForCausalLM
    assert type(model) is expected_class
    # named_parameters lists a tied lm_head once, as the embedding
    text_params = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith(VISION_PREFIXES))
    assert sum(p.numel() for p in model.parameters()) == text_params
    assert not [n for n, _ in model.named_parameters() if "vision" in n or "projector" in n]


def test_weight_names_skip_the_vision_tower(tiny: tuple[Any, Path, str]) -> None:
    hf, path, arch = tiny
    names = [name for name, _ in iterate_weights(path, names=WRAPPERS[type(hf).__name__].model_name)]
    assert names and all(
        n.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) for n in names
    )
    assert ("lm_head.weight" in names) == (arch == "mistral3")


def _write_config(directory: Path, values: dict[str, Any]) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(values))
    return directory


# config.json of Gemma 3 4B as transformers 4.50 wrote it, at tiny sizes: eos ids at the top level only
GEMMA3_4X_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 155, "eoi_token_index": 156,
    "eos_token_id": [1, 106], "image_token_index": 157, "mm_tokens_per_image": 4, "model_type": "gemma3",
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "model_type": "gemma3_text", "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 262,
                    "max_position_embeddings": 96, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 8},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 32, "image_size": 28, "intermediate_size": 64, "model_type": "siglip_vision_model",
                      "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 14, "vision_use_head": False},
}  # fmt: skip
# config.json of Mistral Small 3.1 at tiny sizes, with a quantization_config at the top level as fp8 exports have
MISTRAL3_4X_CONFIG = {
    "architectures": ["Mistral3ForConditionalGeneration"], "image_token_index": 10, "model_type": "mistral3",
    "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
    "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"},
    "text_config": {"head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
                    "max_position_embeddings": 112, "model_type": "mistral", "num_attention_heads": 4,
                    "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1e9,
                    "sliding_window": None, "vocab_size": 300},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"head_dim": 16, "hidden_size": 32, "image_size": 28, "intermediate_size": 64,
                      "model_type": "pixtral", "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 14},
    "vision_feature_layer": -1,
}  # fmt: skip


def test_the_engine_sees_the_text_config(tmp_path: Path) -> None:
    gemma = resolve_model(
        ModelConfig(model=str(_write_config(tmp_path / "g", GEMMA3_4X_CONFIG)), load_format="dummy")
    )
    config = gemma.hf_config
    assert get_model_class(config) is Gemma3ForCausalLM
    assert (config.vocab_size, config.num_hidden_layers, config.sliding_window) == (262, 2, 8)
    assert resolve_max_model_len(None, config) == 96
    assert eos_token_ids(config, gemma.path) == {1, 106}

    mistral = resolve_model(
        ModelConfig(model=str(_write_config(tmp_path / "m", MISTRAL3_4X_CONFIG)), load_format="dummy")
    )
    config = mistral.hf_config
    assert get_model_class(config) is LlamaForCausalLM
    assert (config.vocab_size, config.head_dim, config.tie_word_embeddings) == (300, 16, False)
    assert resolve_max_model_len(None, config) == 112
    assert eos_token_ids(config, mistral.path) == {2}  # MistralConfig's default: config.json names none
    assert config.quantization_config == MISTRAL3_4X_CONFIG["quantization_config"]


def test_top_level_overrides_are_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """hf_overrides of a top-level field the text model never reads warn, naming the text_config form."""
    path = _write_config(tmp_path, GEMMA3_4X_CONFIG)
    with caplog.at_level(logging.WARNING, logger="treadle_model_runner.loader.resolve"):
        resolve_model(
            ModelConfig(model=str(path), load_format="dummy", hf_overrides={"max_position_embeddings": 64})
        )
    assert 'override them inside it, e.g. {"text_config": {"max_position_embeddings": ...}}' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="treadle_model_runner.loader.resolve"):
        overrides = {"text_config": {"max_position_embeddings": 64}, "eos_token_id": [1]}
        config = resolve_model(
            ModelConfig(model=str(path), load_format="dummy", hf_overrides=overrides)
        ).hf_config
    assert "override them inside it" not in caplog.text
    assert resolve_max_model_len(None, config) == 64


def test_dummy_weights_generate(tmp_path: Path) -> None:
    """load_format dummy on a multimodal config.json builds the text model alone and runs it."""
    config = {**MISTRAL3_4X_CONFIG}
    del config["quantization_config"]
    runner = make_runner(_write_config(tmp_path, config), load_format="dummy")
    assert runner.vocab_size == 300 and runner.max_model_len == 112
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", [1, 2, 3, 4, 5], max_tokens=8)
    assert len(sched.run(budget=16)["a"]) == 8
