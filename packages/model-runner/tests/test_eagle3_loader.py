"""EAGLE-3 refusals: each names the option, file or field and what is wrong. No model; a checkpoint that is not an
EAGLE-3 head (another architecture, another speculators type, more than one layer); fc not 3 x the target's hidden
size; another vocabulary; no d2t for a smaller draft vocabulary; taps outside the target's layers; a target whose
decoder keeps no hidden states; LoRA adapters; tensor parallelism. A good head loads and makes the target keep its
hidden states at vLLM's taps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eagle3_fixtures import head_config, random_head, save_head
from test_runner_fakes import make_runner, save_llama

from treadle_model_runner import CacheConfig, LoRAConfig, ModelConfig, SpeculativeConfig
from treadle_model_runner.runner import ModelRunner

VOCAB = 128


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("eagle3_target"), 3, vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)  # fmt: skip


def _head(path: Path, target_hidden: int = 64, drop: tuple[str, ...] = (), **fields: Any) -> Path:
    config = head_config(
        fields.pop("vocab_size", VOCAB), fields.pop("draft_vocab_size", VOCAB // 2), **fields
    )
    tensors = random_head(config, target_hidden, seed=0)
    return save_head(path, config, {k: v for k, v in tensors.items() if k not in drop})


def _load(target: Path, head: Path, **model: Any) -> ModelRunner:
    spec = SpeculativeConfig(method="eagle3", model=str(head), num_speculative_tokens=2)
    return make_runner(target, speculative_config=spec, **model)


def test_a_good_head_loads_and_taps_the_target(target: Path, tmp_path: Path) -> None:
    runner = _load(target, _head(tmp_path / "head"))
    model = runner.model
    assert runner.drafter is not None and model is not None
    assert model.model.aux_layers == (2, 3, 3)  # (2, L // 2, L - 3) of six layers
    assert [a.layer_idx for a in runner.kv_layers()] == list(
        range(7)
    )  # the head's layer after the target's six
    # a checkpoint's own taps (eagle_config) win over the default
    runner = _load(
        target, _head(tmp_path / "own", eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 5]})
    )
    assert runner.model is not None and runner.model.model.aux_layers == (1, 3, 5)
    # vLLM's top-level field first
    runner = _load(target, _head(tmp_path / "top", eagle_aux_hidden_state_layer_ids=[0, 2, 4]))
    assert runner.model is not None and runner.model.model.aux_layers == (0, 2, 4)


def test_a_config_without_method_infers_it_as_vllm(target: Path, tmp_path: Path) -> None:
    """No method: eagle3 for a head named so or whose config.json is one (either format), eagle (refused) for an
    EAGLE-1 name, draft_model for any other model, ngram without one."""
    head = _head(tmp_path / "head")
    plain = save_head(tmp_path / "plain", {"architectures": ["LlamaForCausalLM"]}, {})
    speculators = save_head(tmp_path / "spec", {"architectures": ["Eagle3Speculator"]}, {})
    tagged = save_head(tmp_path / "tagged", {"speculators_model_type": "eagle3"}, {})
    for model in (
        head,
        speculators,
        tagged,
        tmp_path / "my-EAGLE3-head",
        tmp_path / "AngelSlim_Qwen3-8B_eagle3",
    ):
        assert SpeculativeConfig(model=str(model)).method == "eagle3", model
    assert SpeculativeConfig(model=str(plain)).method == "draft_model"
    assert SpeculativeConfig(model=str(tmp_path / "missing")).method == "draft_model"
    assert SpeculativeConfig().method == "ngram"
    with pytest.raises(
        ValueError, match=r"method 'eagle' is not supported; supported: ngram, draft_model, eagle3"
    ):
        SpeculativeConfig(model="yuhuili/EAGLE-LLaMA3-Instruct-8B")
    # and the inferred head serves as one
    runner = make_runner(
        target, speculative_config=SpeculativeConfig(model=str(head), num_speculative_tokens=2)
    )
    assert runner.drafter is not None and type(runner.drafter).__name__ == "Eagle3Drafter"


def test_eagle3_without_a_model_is_refused() -> None:
    with pytest.raises(ValueError, match=r"method 'eagle3' needs a model: the EAGLE-3 head's directory"):
        SpeculativeConfig(method="eagle3")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            r"architectures \['LlamaForCausalLM'\] is not an EAGLE-3 head",
        ),
        (
            {"architectures": ["EagleSpeculator"], "speculators_model_type": "eagle"},
            r"speculators_model_type 'eagle'; treadle reads speculators checkpoints of type 'eagle3'",
        ),
        (
            {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3"},
            r"a speculators checkpoint without a transformer_layer_config object",
        ),
        ({"num_hidden_layers": 2}, r"num_hidden_layers 2; treadle runs EAGLE-3 heads of one layer"),
        ({"vocab_size": 1000}, r"vocab_size 1000 but the target's is 128: an EAGLE-3 head must share"),
        ({"target_hidden_size": 32}, r"target_hidden_size 32 but the target's hidden_size is 64"),
        (
            {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 6]}},
            r"eagle_config.eagle_aux_hidden_state_layer_ids names target layers \[1, 3, 6\], but EAGLE-3 reads "
            r"three layers among the target's 6",
        ),
    ],
)
def test_config_fields_are_refused_by_name(
    target: Path, tmp_path: Path, fields: dict[str, Any], match: str
) -> None:
    head = _head(tmp_path / "head", **fields)
    with pytest.raises(ValueError, match=match) as info:
        _load(target, head)
    assert str(head / "config.json") in str(info.value)


def test_fc_not_three_times_the_targets_hidden_size_is_refused(target: Path, tmp_path: Path) -> None:
    head = _head(tmp_path / "head", target_hidden=48)
    with pytest.raises(
        ValueError, match=r"fc.weight has shape \(64, 144\); .* 3 x its hidden_size \(64\) = 192"
    ):
        _load(target, head)


def test_a_missing_d2t_is_refused_unless_the_vocabularies_are_one(target: Path, tmp_path: Path) -> None:
    head = _head(tmp_path / "head", drop=("d2t",))
    with pytest.raises(ValueError, match=r"holds no d2t tensor, which maps the head's 64 draft token ids"):
        _load(target, head)
    _load(target, _head(tmp_path / "full", drop=("d2t",), draft_vocab_size=VOCAB))


def test_a_d2t_outside_the_vocabulary_is_refused(target: Path, tmp_path: Path) -> None:
    head = _head(tmp_path / "head")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(head / "model.safetensors"))
    tensors["d2t"][-1] = VOCAB
    save_file(tensors, str(head / "model.safetensors"))
    with pytest.raises(ValueError, match=r"d2t maps draft token ids to target ids in \[1, 191\], outside"):
        _load(target, head)


def test_a_target_without_hidden_state_taps_is_refused(tmp_path: Path) -> None:
    import transformers as tf

    olmo = tmp_path / "olmo2"
    tf.Olmo2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256).save_pretrained(olmo)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"'eagle3' reads the target's hidden states .* Olmo2ForCausalLM does not"
    ):
        _load(olmo, _head(tmp_path / "head"), load_format="dummy")


def test_lora_and_tensor_parallelism_are_refused(target: Path, tmp_path: Path) -> None:
    spec = SpeculativeConfig(method="eagle3", model=str(_head(tmp_path / "head")))
    cache = CacheConfig(block_size=4, num_gpu_blocks_override=64)
    with pytest.raises(
        ValueError, match=r"method 'eagle3' does not run with LoRA adapters \(--enable-lora\)"
    ):
        ModelRunner(ModelConfig(str(target), dtype="float32"), cache, 8, 64, "cpu",
                    lora_config=LoRAConfig(enable_lora=True), speculative_config=spec)  # fmt: skip
    with pytest.raises(ValueError, match=r"method 'eagle3' runs on one device; tensor_parallel_size is 2"):
        ModelRunner(ModelConfig(str(target), dtype="float32", tensor_parallel_size=2), cache, 8, 64, "cpu",
                    speculative_config=spec)  # fmt: skip


def test_a_directory_without_config_is_refused(target: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"config.json is missing; give the EAGLE-3 head's directory"):
        _load(target, tmp_path / "empty")
