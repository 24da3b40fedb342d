"""hf_overrides (vLLM's): config.json fields replaced before the model config is built.

The case users need it for: YaRN on a checkpoint whose config.json has none (Qwen's long-context recipe through
`--hf-overrides '{"rope_parameters": {...}}'`). A tiny Qwen3 saved with a plain rope config, loaded with YaRN
overrides, must equal HF's model built with YaRN (and differ from it without them); its context becomes
original x factor. Also: the transformers path (a family the light config reader leaves to transformers), and the
errors for overrides that are not a JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from model_parity import check_mixed_batch
from test_models import COMMON
from test_runner_fakes import make_runner, perturb_

from treadle_model_runner import ModelConfig
from treadle_model_runner.layers.rotary import rope_parameters
from treadle_model_runner.loader.resolve import load_hf_config

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 100.0}


@pytest.fixture(scope="module")
def plain_dir_and_yarn_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A Qwen3 with YaRN (HF, the reference) whose directory's config.json says plain rope."""
    torch.manual_seed(5)
    hf = tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16, rope_parameters=dict(YARN))).eval()
    perturb_(hf, seed=2, std=0.15)
    path = tmp_path_factory.mktemp("qwen3_plain")
    hf.save_pretrained(path, safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 100.0}
    (path / "config.json").write_text(json.dumps(config))
    return path, hf


def test_yarn_overrides_match_hf_with_yarn(plain_dir_and_yarn_model: tuple[Path, Any]) -> None:
    path, hf = plain_dir_and_yarn_model
    check_mixed_batch(hf, path, COMMON["vocab_size"], hf_overrides=json.dumps({"rope_parameters": YARN}))
    runner = make_runner(path, hf_overrides={"rope_parameters": YARN})
    assert runner.max_model_len == 4 * 128  # original x factor
    with pytest.raises(AssertionError):  # the premise: without the overrides the model differs
        check_mixed_batch(hf, path, COMMON["vocab_size"])


def test_rope_scaling_spelling_updates_the_files_rope_parameters(
    plain_dir_and_yarn_model: tuple[Path, Any],
) -> None:
    """The older `rope_scaling` key (with "type"), over a config.json that transformers 5 wrote with a
    `rope_parameters` dict: the file's dict takes the scaling and keeps its rope_theta (100 here, not 10,000)."""
    path, hf = plain_dir_and_yarn_model
    old_spelling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    check_mixed_batch(hf, path, COMMON["vocab_size"], hf_overrides={"rope_scaling": old_spelling})


def _yarn_fields(config: Any) -> tuple[Any, ...]:
    """(rope_type, factor, rope_theta) of a config's rope parameters."""
    params = rope_parameters(config)
    return params["rope_type"], params["factor"], params["rope_theta"]


def test_rope_scaling_spelling_on_a_transformers_built_config(tmp_path: Path) -> None:
    tf.Olmo2Config(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 100.0}).save_pretrained(
        tmp_path
    )
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert _yarn_fields(load_hf_config(tmp_path, {"rope_scaling": scaling})) == ("yarn", 4.0, 100.0)


def test_overrides_reach_a_transformers_built_config(tmp_path: Path) -> None:
    """Gemma 3 is read by transformers (not the light reader): an overridden field arrives, the rest stays."""
    config = tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=6, query_pre_attn_scalar=24)
    config.save_pretrained(tmp_path)
    plain = load_hf_config(tmp_path)
    overridden = load_hf_config(tmp_path, {"sliding_window": 3})
    assert type(overridden) is type(plain) is tf.Gemma3TextConfig
    assert (plain.sliding_window, overridden.sliding_window) == (6, 3)
    assert overridden.query_pre_attn_scalar == 24 and overridden.layer_types == plain.layer_types


@pytest.mark.parametrize(
    ("value", "message"),
    [("{not json", r"hf_overrides '\{not json' is not JSON"), ("[1, 2]", r"must be a JSON object.*\[1, 2\]")],
)
def test_bad_overrides_are_named(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(model="m", hf_overrides=value)
    assert ModelConfig(model="m", hf_overrides="{}").hf_overrides is None


def _qwen3_config_json(path: Path, rope: dict[str, Any]) -> None:
    """A Qwen3 config.json with `rope` as its rope fields, no layer_types (as Qwen3's files): the light reader's."""
    config = tf.Qwen3Config(**COMMON, head_dim=16).to_dict()
    for derived in ("rope_parameters", "layer_types"):
        config.pop(derived)
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"], **rope}))


@pytest.mark.parametrize(
    "file_rope",
    [
        # transformers 4's spelling (Qwen3's own config.json files), then transformers 5's
        {"rope_theta": 1e6, "rope_scaling": None},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ],
    ids=["flat-theta", "rope-parameters"],
)
def test_rope_parameters_override_without_theta_keeps_the_files(
    tmp_path: Path, file_rope: dict[str, Any]
) -> None:
    """`{"rope_parameters": {"rope_type": "yarn", ...}}` with no rope_theta: YaRN is applied over the file's theta.
    Before, the light reader ignored the dict (no YaRN at all) and transformers reset the theta to 10,000."""
    _qwen3_config_json(tmp_path, file_rope)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert _yarn_fields(load_hf_config(tmp_path, {"rope_parameters": yarn})) == ("yarn", 4.0, 1e6)
    assert rope_parameters(load_hf_config(tmp_path, {"rope_theta": 5e5}))["rope_theta"] == 5e5


def test_text_config_override_updates_a_multimodal_checkpoints_text_config(tmp_path: Path) -> None:
    """`{"text_config": {...}}` (how a multimodal checkpoint's language model is overridden) changes the fields it
    names; before, it replaced the whole text_config, which fell back to Gemma 3's default sizes."""
    tf.Gemma3Config(
        text_config=dict(COMMON, head_dim=16, sliding_window=6),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    ).save_pretrained(tmp_path)
    text = load_hf_config(tmp_path, {"text_config": {"max_position_embeddings": 256}}).text_config
    assert (text.max_position_embeddings, text.hidden_size, text.num_hidden_layers, text.sliding_window) == (
        256,
        64,
        2,
        6,
    )


def test_a_field_of_the_wrong_type_is_a_value_error(tmp_path: Path) -> None:
    """transformers 5 validates config fields with huggingface_hub's strict dataclasses, whose error is no
    ValueError: it must still reach the user as one line naming the file and the overrides, not a traceback."""
    tf.Olmo2Config(**COMMON).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"config\.json with hf_overrides \['num_hidden_layers'\] cannot be read"
    ):
        load_hf_config(tmp_path, {"num_hidden_layers": "two"})
