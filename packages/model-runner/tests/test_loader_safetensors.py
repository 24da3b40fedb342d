"""Safetensors reading, model resolution and dummy weights, on tiny directories built in the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from treadle_model_runner import ModelConfig
from treadle_model_runner.loader import (
    iterate_weights,
    load_dummy_weights,
    make_dummy_model_dir,
    resolve_model,
)

BENCHMARK_CONFIGS = Path(__file__).resolve().parents[3] / "benchmarks" / "configs"


def tiny_llama_config(**overrides: object) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 128,
    }
    config.update(overrides)
    return config


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 32, generator=gen) for i in range(2)}
    tensors["model.embed_tokens.weight"] = torch.randn(100, 32, generator=gen).to(torch.bfloat16)
    tensors["model.norm.weight"] = torch.randn(32, generator=gen)
    return tensors


def write_single(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(tiny_llama_config()))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def write_sharded(path: Path, tensors: dict[str, torch.Tensor], num_shards: int = 3) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(tiny_llama_config()))
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[shard::num_shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_sharded_and_single_give_identical_tensors(tmp_path: Path) -> None:
    tensors = random_tensors(int(torch.randint(0, 2**31, ()).item()))
    single = dict(iterate_weights(write_single(tmp_path / "single", tensors)))
    sharded = dict(iterate_weights(write_sharded(tmp_path / "sharded", tensors), "safetensors"))
    assert set(single) == set(sharded) == set(tensors)
    for name, ref in tensors.items():
        assert single[name].dtype == sharded[name].dtype == ref.dtype
        assert torch.equal(single[name], ref) and torch.equal(sharded[name], ref), name


def test_iterate_weights_casts_to_dtype(tmp_path: Path) -> None:
    tensors = random_tensors(1)
    got = dict(iterate_weights(write_single(tmp_path / "m", tensors), dtype=torch.float16))
    assert all(t.dtype == torch.float16 for t in got.values())
    torch.testing.assert_close(got["model.norm.weight"], tensors["model.norm.weight"].half())


def test_index_selects_files_and_ignores_strays(tmp_path: Path) -> None:
    tensors = random_tensors(2)
    path = write_sharded(tmp_path / "m", tensors, num_shards=2)
    save_file({"consolidated": torch.zeros(3)}, str(path / "consolidated.safetensors"))  # e.g. Mistral's
    assert set(dict(iterate_weights(path))) == set(tensors)


def test_resolve_model_hf_directory(tmp_path: Path) -> None:
    path = write_sharded(tmp_path / "m", random_tensors(3))
    resolved = resolve_model(ModelConfig(model=str(path), tokenizer=str(tmp_path / "tok")))
    assert resolved.format == "safetensors" and resolved.path == path and resolved.source == path
    assert resolved.tokenizer_path == tmp_path / "tok"
    assert resolved.hf_config.model_type == "llama" and resolved.hf_config.num_key_value_heads == 2


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-0.6b", "qwen3-30b-a3b"])
def test_dummy_model_dir_from_benchmark_config(tmp_path: Path, name: str) -> None:
    source = BENCHMARK_CONFIGS / name / "config.json"
    out = make_dummy_model_dir(source, tmp_path / name)
    resolved = resolve_model(ModelConfig(model=str(out), load_format="dummy"))
    assert resolved.format == "dummy" and resolved.path == out
    assert resolved.hf_config.hidden_size == json.loads(source.read_text())["hidden_size"]
    # a config.json file works as well as its directory
    assert resolve_model(ModelConfig(model=str(source), load_format="dummy")).path == source.parent


def test_make_dummy_model_dir_from_dict_and_config(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    a = make_dummy_model_dir(tiny_llama_config(hidden_size=48), tmp_path / "a")
    b = make_dummy_model_dir(LlamaConfig(**tiny_llama_config(hidden_size=48)), tmp_path / "b")
    for path in (a, b):
        assert resolve_model(ModelConfig(model=str(path), load_format="dummy")).hf_config.hidden_size == 48
    with pytest.raises(ValueError, match="model_type"):
        make_dummy_model_dir({"hidden_size": 4}, tmp_path / "c")


def _tiny_model(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_llama_config(attention_bias=True, tie_word_embeddings=False))
    return LlamaForCausalLM(config)


def test_dummy_weights_are_deterministic_and_shaped_for_inference() -> None:
    a, b, c = _tiny_model(0), _tiny_model(1), _tiny_model(2)
    load_dummy_weights(a, seed=7)
    load_dummy_weights(b, seed=7)
    load_dummy_weights(c, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)  # same seed -> same values, whatever the init was
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(sa[up], sc[up])  # another seed -> other values
    assert not torch.equal(sa[up], sa["model.layers.1.mlp.up_proj.weight"])  # each parameter its own stream
    assert torch.equal(sa["model.layers.0.input_layernorm.weight"], torch.ones(32))
    assert torch.equal(sa["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))
    assert abs(sa["model.embed_tokens.weight"].std().item() - 0.02) < 0.002
    logits = a(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 10


def test_dummy_weights_do_not_depend_on_visit_order() -> None:
    class Pair(torch.nn.Module):
        def __init__(self, reverse: bool) -> None:
            super().__init__()
            names = ["a", "b"] if not reverse else ["b", "a"]
            for name in names:
                self.register_parameter(name, torch.nn.Parameter(torch.empty(4, 4)))

    x, y = Pair(False), Pair(True)
    load_dummy_weights(x, seed=3)
    load_dummy_weights(y, seed=3)
    assert all(torch.equal(x.get_parameter(n), y.get_parameter(n)) for n in ("a", "b"))


@pytest.mark.gpu
def test_dummy_weights_on_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _tiny_model().to("cuda", torch.bfloat16)
    load_dummy_weights(model, seed=1)
    weight = model.model.embed_tokens.weight
    assert weight.device.type == "cuda" and abs(weight.float().std().item() - 0.02) < 0.002


def test_yielded_tensors_are_writable_without_touching_the_file(tmp_path: Path) -> None:
    tensors = random_tensors(4)
    path = write_single(tmp_path / "m", tensors)
    before = (path / "model.safetensors").read_bytes()
    got = dict(iterate_weights(path))
    got["model.norm.weight"].add_(1.0)  # copy-on-write: the model may own and modify what it is given
    torch.testing.assert_close(got["model.norm.weight"], tensors["model.norm.weight"] + 1.0)
    assert (path / "model.safetensors").read_bytes() == before
    assert torch.equal(dict(iterate_weights(path))["model.norm.weight"], tensors["model.norm.weight"])


def test_unaligned_tensor_data_is_read_correctly(tmp_path: Path) -> None:
    import struct

    values = torch.randn(3)
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},  # starts at an odd byte
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_llama_config()))
    data = struct.pack("<Q", len(raw)) + raw + bytes([7]) + values.numpy().tobytes()
    (path / "model.safetensors").write_bytes(data)
    got = dict(iterate_weights(path))
    assert torch.equal(got["w"], values) and got["flag"].tolist() == [7]
