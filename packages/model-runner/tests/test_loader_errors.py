"""Every loader error: a ValueError naming the file and the problem (and, where there is one, the fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_loader_gguf import tiny_gguf, write_tiny_gguf

from treadle_model_runner import ModelConfig, envs
from treadle_model_runner.loader import iterate_weights, resolve_model

__all__ = ["tiny_gguf"]  # the fixture, re-exported so pytest finds it here

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}


def model_dir(tmp_path: Path, *, config: bool = True) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    if config:
        (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def good_file(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(tensors or {"a": torch.randn(16, 16), "b": torch.randn(4)}, str(path))
    return path


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model directory .*nowhere does not exist"):
        list(iterate_weights(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"'.*nowhere'.*does not exist; pass an HF-format directory"):
        resolve_model(ModelConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"'org/model'.*never downloads.*hf download org/model --local-dir"):
        resolve_model(ModelConfig(model="org/model"))


def test_missing_config_json(tmp_path: Path) -> None:
    path = model_dir(tmp_path, config=False)
    good_file(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model/config\.json is missing"):
        list(iterate_weights(path))
    with pytest.raises(ValueError, match=r"model/config\.json is missing"):
        resolve_model(ModelConfig(model=str(path)))


def test_missing_shard(tmp_path: Path) -> None:
    path = model_dir(tmp_path)
    good_file(path / "model-00001-of-00002.safetensors", {"a": torch.zeros(2)})
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"shard .*model-00002-of-00002\.safetensors is missing.*'b'"):
        list(iterate_weights(path))
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors is missing"):
        resolve_model(ModelConfig(model=str(path)))


def test_shard_lacking_a_tensor_the_index_names(tmp_path: Path) -> None:
    path = model_dir(tmp_path)
    good_file(path / "model-00001-of-00001.safetensors", {"a": torch.zeros(2)})
    weight_map = {"a": "model-00001-of-00001.safetensors", "ghost": "model-00001-of-00001.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model-00001-of-00001\.safetensors lacks 1 tensors .*'ghost'"):
        list(iterate_weights(path))


@pytest.mark.parametrize("index", ["{not json", '{"metadata": {}}', '{"weight_map": [1, 2]}'])
def test_malformed_index(tmp_path: Path, index: str) -> None:
    path = model_dir(tmp_path)
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not a valid safetensors index"):
        list(iterate_weights(path))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_safetensors(tmp_path: Path, damage: str) -> None:
    path = model_dir(tmp_path)
    data = good_file(tmp_path / "good.safetensors").read_bytes()
    broken = {"truncate": data[: len(data) - 100], "garbage": b"\xff" * 64, "empty": b""}[damage]
    (path / "model.safetensors").write_bytes(broken)
    with pytest.raises(ValueError, match=r"model/model\.safetensors is corrupt or truncated"):
        list(iterate_weights(path))


def test_only_pickle_weights_says_how_to_convert(tmp_path: Path) -> None:
    path = model_dir(tmp_path)
    torch.save({"a": torch.zeros(2)}, path / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"only PyTorch pickle weights \(pytorch_model\.bin\).*save_pretrained"
    ):
        list(iterate_weights(path))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        resolve_model(ModelConfig(model=str(path)))


def test_directory_without_weights(tmp_path: Path) -> None:
    path = model_dir(tmp_path)
    with pytest.raises(ValueError, match=r"model holds no \*\.safetensors weights"):
        list(iterate_weights(path))
    with pytest.raises(ValueError, match=r"model holds no weights .*load_format 'dummy'"):
        resolve_model(ModelConfig(model=str(path)))


def test_duplicate_tensor_without_index(tmp_path: Path) -> None:
    path = model_dir(tmp_path)
    good_file(path / "a.safetensors", {"w": torch.zeros(2)})
    good_file(path / "b.safetensors", {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"tensor 'w' appears in both .*a\.safetensors and .*b\.safetensors"):
        list(iterate_weights(path))


def test_unknown_load_format_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"load_format 'pickle' is not one of auto, safetensors, gguf"):
        list(iterate_weights(model_dir(tmp_path), "pickle"))
    with pytest.raises(
        ValueError, match=r"load_format 'pickle' is not one of auto, safetensors, gguf, dummy"
    ):
        ModelConfig(model="x", load_format="pickle")


def test_dummy_reads_no_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'dummy' reads no weights.*load_dummy_weights"):
        list(iterate_weights(model_dir(tmp_path), "dummy"))


def test_dummy_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model/config\.json is missing"):
        resolve_model(ModelConfig(model=str(model_dir(tmp_path, config=False)), load_format="dummy"))


def test_unreadable_config_json(tmp_path: Path) -> None:
    path = model_dir(tmp_path)
    (path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match=r"model/config\.json cannot be read as a transformers config"):
        resolve_model(ModelConfig(model=str(path), load_format="dummy"))


def test_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz is a file but not a \.gguf file"):
        resolve_model(ModelConfig(model=str(path)))
    with pytest.raises(ValueError, match=r"load_format 'gguf' was asked but .*weights\.npz .*no \.gguf file"):
        resolve_model(ModelConfig(model=str(path), load_format="gguf"))


def test_several_gguf_files_in_a_directory(tmp_path: Path) -> None:
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(
        ValueError, match=r"holds 2 GGUF files \(a\.Q4_0\.gguf, a\.Q8_0\.gguf\); pass one file"
    ):
        resolve_model(ModelConfig(model=str(tmp_path)))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TREADLE_CACHE_DIR", "relative/dir", r"TREADLE_CACHE_DIR='relative/dir' is not an absolute path"),
        ("XDG_CACHE_HOME", "rel", r"XDG_CACHE_HOME='rel' is not an absolute path"),
        ("TREADLE_CONVERSION_PROGRESS", "maybe", r"TREADLE_CONVERSION_PROGRESS='maybe' is not a boolean"),
    ],
)
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.delenv("TREADLE_CACHE_DIR", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        envs.TREADLE_CACHE_DIR()
        envs.TREADLE_CONVERSION_PROGRESS()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TREADLE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert envs.TREADLE_CACHE_DIR() == tmp_path / "home" / ".cache" / "treadle"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert envs.TREADLE_CACHE_DIR() == tmp_path / "xdg" / "treadle"
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "mine"))
    assert envs.TREADLE_CACHE_DIR() == tmp_path / "mine"


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, arch="bert")
    with pytest.raises(ValueError, match=r"other\.gguf.*architecture 'bert'.*llama"):
        list(iterate_weights(path))


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf file at all"])
def test_corrupt_gguf_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.gguf is corrupt, truncated or not a GGUF file"):
        list(iterate_weights(path, "gguf"))


def test_truncated_gguf_is_named(tiny_gguf: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.gguf is corrupt, truncated"):
        list(iterate_weights(cut))


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"GGUF file .*absent\.gguf does not exist"):
        list(iterate_weights(tmp_path / "absent.gguf"))
