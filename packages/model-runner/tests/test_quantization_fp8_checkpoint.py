"""Pre-quantized fp8 checkpoints (compressed-tensors and quant_method fp8) against an independent reference (CPU, fp32).

Each tiny random Llama (attention and MLP biases), Qwen3 (q/k norms) and Gemma 3 (GELU, sliding window, tied
embeddings) is quantized in the test with torch's e4m3
cast and written in each format (fp8_checkpoints.py: per-channel and per-tensor weight scales, dynamic and
calibrated static activations, one checkpoint sharded, one with an ignored projection and K/V cache scales). The
runner loads it with no --quantization (detected from config.json), and:
- a mixed step's logits are within 1e-4 of the reference's (fp8_reference.fp8_checkpoint_reference: the HF model
  computing with the files' fp8 values and scales), far from the unquantized model's; greedy continuations equal
  the reference's `generate`;
- the projections hold the files' fp8 bytes and scales exactly (per-tensor ones broadcast to every row of their
  shard; a stacked layer's static input scale is its shards' largest); ignored ones, the embedding and the lm_head
  stay fp32;
- the layouts treadle cannot load, and files that disagree with their config.json, are refused naming the field
  (and config.json) or the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_checkpoints import FORMATS, read_checkpoint, write_checkpoint, write_fp8_checkpoint
from fp8_reference import fp8_checkpoint_reference
from test_models import COMMON, _config
from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
from test_runner_fakes import make_runner, perturb_

from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.loader import make_dummy_model_dir
from treadle_model_runner.quantization import resolve_quantization

ARCHS = ["llama", "qwen3", "gemma3"]
CASES = [(arch, fmt) for arch in ARCHS for fmt in FORMATS]
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _hf(arch: str) -> Any:
    config, cls = _config(arch)
    torch.manual_seed(ARCHS.index(arch))
    hf = cls(config).eval()
    perturb_(hf, seed=1, std=0.15)
    return hf


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{f}" for a, f in CASES])
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Any, Path]:
    arch, fmt = request.param
    hf = _hf(arch)
    path = tmp_path_factory.mktemp(f"{arch}-{fmt}")
    write_fp8_checkpoint(hf, path, FORMATS[fmt])
    return hf, fp8_checkpoint_reference(hf, read_checkpoint(path)), path


def test_mixed_batch_logits_match_the_checkpoint_reference(checkpoint: tuple[Any, Any, Path]) -> None:
    hf, ref, path = checkpoint
    check_mixed_batch_logits(make_runner(path), ref, hf)


def test_greedy_continuations_match_the_checkpoint_reference(checkpoint: tuple[Any, Any, Path]) -> None:
    _, ref, path = checkpoint
    check_greedy_continuations(make_runner(path, max_num_batched_tokens=16), ref)


def _file_rows(files: dict[str, torch.Tensor], hf_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's fp8 bytes [n, k] and its weight scale broadcast to per row [n]."""
    weight = files[f"{hf_name}.weight"]
    return weight.view(torch.uint8), files[f"{hf_name}.weight_scale"].float().reshape(-1).expand(
        weight.shape[0]
    )


def test_projections_hold_the_files_bytes_and_scales(checkpoint: tuple[Any, Any, Path]) -> None:
    check_projections_hold_the_files(make_runner(checkpoint[2]), read_checkpoint(checkpoint[2]))


def check_projections_hold_the_files(runner: Any, files: dict[str, torch.Tensor]) -> None:
    """Every projection holds its checkpoint tensors' fp8 bytes and scales (a stacked one, its shards' in order,
    or the file's own stacked tensor), ignored ones the file's fp32 weight; the vocabulary ends stay fp32."""
    model = runner._require_model()
    assert runner.describe()["quantization"].startswith("fp8 checkpoint")
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}" for p in STACKED.get(leaf, (leaf,))]
        if f"{name}.weight" in files:  # stacked in the checkpoint too (Phi-3)
            parts = [name]
        if f"{parts[0]}.weight_scale" not in files:  # ignored: the file's fp32 weight, no scales
            assert layer.weight.dtype == torch.float32 and layer.weight_scale is None, name
            assert torch.equal(layer.weight, torch.cat([files[f"{p}.weight"] for p in parts])), name
            continue
        rows = [_file_rows(files, p) for p in parts]
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale is not None, name
        assert torch.equal(layer.weight.view(torch.uint8), torch.cat([r[0] for r in rows])), name
        assert torch.equal(layer.weight_scale, torch.cat([r[1] for r in rows])), name
        if f"{parts[0]}.input_scale" in files:
            largest = max(float(files[f"{p}.input_scale"]) for p in parts)
            assert layer.input_scale is not None and float(layer.input_scale) == largest, name
        else:
            assert layer.input_scale is None, name
        checked += 1
    assert checked >= 4 * model.config.num_hidden_layers - 1
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_explicit_fp8_loads_the_same_and_another_method_is_refused(tmp_path: Path) -> None:
    hf = _hf("llama")
    write_fp8_checkpoint(hf, tmp_path, FORMATS["ct-channel-dynamic"])
    auto, explicit = (
        make_runner(tmp_path)._require_model(),
        make_runner(tmp_path, quantization="fp8")._require_model(),
    )
    for a, b in zip(auto.parameters(), explicit.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # ModelConfig accepts only fp8 today; the plan names both methods should another one be requested
    with pytest.raises(
        ValueError, match=r"quantization 'awq' was requested.*fp8 checkpoint.*compressed-tensors"
    ):
        resolve_quantization("awq", auto.config, type(auto), tmp_path / "config.json", "safetensors")


def test_vllm_method_spellings(tmp_path: Path) -> None:
    """vLLM's names: `quantization="compressed-tensors"` with such a checkpoint, and config.json's quant_method in any
    case or with an underscore; a method named for another checkpoint, or for a model with none, is refused."""
    hf = _hf("llama")
    write_fp8_checkpoint(hf, tmp_path, FORMATS["ct-channel-dynamic"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "Compressed_Tensors"
    (tmp_path / "config.json").write_text(json.dumps(config))
    auto = make_runner(tmp_path)._require_model()
    named = make_runner(tmp_path, quantization="compressed-tensors")._require_model()
    for a, b in zip(auto.parameters(), named.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert any(p.dtype == torch.float8_e4m3fn for p in auto.parameters())
    static = tmp_path / "static"
    write_fp8_checkpoint(hf, static, FORMATS["fp8-static"])
    with pytest.raises(
        ValueError, match=r"quantization 'compressed-tensors' was requested.*quant_method 'fp8'"
    ):
        make_runner(static, quantization="compressed-tensors")
    plain = make_dummy_model_dir(tf.LlamaConfig(**COMMON), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"names a checkpoint format.*no quantization_config; pass fp8"):
        make_runner(plain, quantization="compressed-tensors", load_format="dummy")
    config["quantization_config"] = "fp8"
    (tmp_path / "config.json").write_text(json.dumps(config))
    # named by treadle's own reader or by transformers', whichever reads the file
    bad = r"config\.json.*(must be a JSON object|cannot be read as a transformers config)"
    with pytest.raises(ValueError, match=bad):
        make_runner(tmp_path)


def _config_with(tmp_path: Path, quant: dict[str, Any]) -> Path:
    data = tf.LlamaConfig(**COMMON).to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["quantization_config"] = quant
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(data))
    return path


def _ct(
    weights: dict[str, Any] | None = None, acts: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """A compressed-tensors FP8-dynamic quantization_config with fields replaced."""
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    group = {"targets": ["Linear"], "weights": {**args, "strategy": "channel", "dynamic": False, **(weights or {})},
             "input_activations": {**args, "strategy": "token", "dynamic": True, **(acts or {})}}  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": group},
            "ignore": ["lm_head"], **top}  # fmt: skip


REFUSED = {
    "block fp8, static": ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [16, 16]},
                          r"quantization_config\.activation_scheme is 'static'.*per token group"),
    # 4-bit methods load (test_quantization_int4_*.py), but not without their group size
    "awq": ({"quant_method": "awq", "bits": 4}, r"quantization_config\.group_size is None"),
    "gptq": ({"quant_method": "gptq", "bits": 4}, r"quantization_config\.group_size is None"),
    "bitsandbytes": ({"quant_method": "bitsandbytes"}, r"quant_method is 'bitsandbytes'"),
    "fp8 scheme": ({"quant_method": "fp8", "activation_scheme": "per_block"}, r"activation_scheme is 'per_block'"),
    "int8": (_ct({"type": "int"}, {"type": "int"}), r"config_groups\.group_0\.weights\.type is 'int'"),
    "4-bit": (_ct({"num_bits": 4}), r"group_0\.weights\.num_bits is 4"),
    "group-wise": (_ct({"strategy": "group", "group_size": 128}), r"group_0\.weights\.group_size is 128"),
    "block-wise, no block": (_ct({"strategy": "block"}),
                             r"group_0\.weights\.block_structure is None.*\[block_n, block_k\]"),
    "asymmetric": (_ct({"symmetric": False}), r"group_0\.weights\.symmetric is False"),
    "packed": (_ct(format="pack-quantized"), r"quantization_config\.format is 'pack-quantized'"),
    "group acts": (_ct(acts={"strategy": "group", "dynamic": "local"}),
                   r"group_0\.input_activations\.strategy is \"group \(dynamic 'local'\)\""),
    "sparse": (_ct(sparsity_config={"format": "sparse-24-bitmask"}), r"quantization_config\.sparsity_config is"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_unloadable_layouts_are_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    quant, match = REFUSED[case]
    path = _config_with(tmp_path, quant)
    with pytest.raises(ValueError, match=match) as info:
        make_runner(path, load_format="dummy")
    assert str(path / "config.json") in str(info.value)


def _llama_checkpoint(tmp_path: Path, edit: Any, fmt: str = "ct-channel-dynamic") -> Path:
    """A tiny Llama fp8 checkpoint whose tensors (and quantization_config) `edit(tensors, quant)` changed."""
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    path = tmp_path / "ckpt"
    tensors = write_fp8_checkpoint(hf, path, FORMATS[fmt])
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    edit(tensors, quant)
    for file in path.glob("*.safetensors*"):
        file.unlink()
    write_checkpoint(hf, path, tensors, quant)
    return path


def _unquantize_q(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64)


def _quantize_lm_head(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.float8_e4m3fn)


def _ignore_k(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    quant["ignore"].append("model.layers.1.self_attn.k_proj")


def _bad_scale(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(3, 1)


def _static_scale_with_dynamic_activations(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    tensors["model.layers.0.mlp.down_proj.input_scale"] = torch.ones(1)


MISMATCHED = {
    "unquantized projection": (_unquantize_q, r"'model\.layers\.0\.self_attn\.q_proj\.weight' is torch\.float32.*"
                               r"makes this projection float8_e4m3fn"),
    "quantized lm_head": (_quantize_lm_head, r"'lm_head\.weight' is torch\.float8_e4m3fn and lm_head\.weight is "
                          r"torch\.float32.*leaves it unquantized"),
    "split stacked layer": (_ignore_k, r"makes .*q_proj.*v_proj fp8 but leaves model\.layers\.1\.self_attn\.k_proj "
                            r"unquantized.*ignore all of them or none"),
    "scale shape": (_bad_scale, r"'model\.layers\.0\.mlp\.down_proj\.weight_scale' has shape \(3, 1\)"),
    "input scale, dynamic activations": (_static_scale_with_dynamic_activations,
                                         r"'model\.layers\.0\.mlp\.down_proj\.input_scale' is a static activation "
                                         r"scale.*activations dynamically"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_files_that_disagree_with_config_json_are_refused(tmp_path: Path, case: str) -> None:
    edit, match = MISMATCHED[case]
    path = _llama_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        make_runner(path)


@pytest.mark.parametrize(("fmt", "dropped"), [("ct-channel-dynamic", "self_attn.q_proj.weight_scale"),
                                              ("fp8-static", "mlp.up_proj.input_scale")])  # fmt: skip
def test_a_missing_scale_is_named_as_the_checkpoint_spells_it(tmp_path: Path, fmt: str, dropped: str) -> None:
    """A scale the checkpoint lacks is named by its tensor name in the files (q_proj's, not the fused qkv_proj's),
    with the directory and the files it looked in."""
    name = f"model.layers.0.{dropped}"
    path = _llama_checkpoint(tmp_path, lambda tensors, quant: tensors.pop(name), fmt)
    assert [p.name for p in path.glob("*.safetensors*")] == ["model.safetensors"]
    with pytest.raises(ValueError) as info:
        make_runner(path)
    message = str(info.value)
    where = f"checkpoint {path} (model.safetensors)"
    assert f"{where} is missing 1 tensors LlamaForCausalLM needs: {name} (" in message, message
    assert "qkv_proj" not in message and "gate_up_proj" not in message, message


def test_kv_cache_scales_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _llama_checkpoint(tmp_path, lambda t, q: None, fmt="ct-tensor-static")
    with caplog.at_level("INFO", logger="treadle_model_runner.quantization"):
        make_runner(path)
    assert "4 K/V cache scale tensors ignored" in caplog.text  # k_scale and v_scale of 2 layers


def test_dummy_weights_with_an_fp8_checkpoint_config_are_quantized_online(tmp_path: Path) -> None:
    path = _config_with(tmp_path, _ct(acts={"strategy": "tensor", "dynamic": False}))
    runner = make_runner(path, load_format="dummy")
    assert runner.quantization is not None and runner.quantization.is_online
    layers = [m for m in runner._require_model().modules() if isinstance(m, Linear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn and m.input_scale is None for m in layers)
    assert runner.describe()["quantization"] == "fp8"


def test_static_fp8_moe_configs_load_with_dummy_weights(tmp_path: Path) -> None:
    """A compressed-tensors static (per-tensor input_scale) MoE config.json loads (it was refused before MoE experts
    had static activations): dummy weights have no calibrated scales, so the experts are quantized online per
    channel, dynamically (checkpoints with their scales: test_quantization_fp8_moe_static.py)."""
    config = tf.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    path = make_dummy_model_dir(config, tmp_path / "moe")
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = _ct(acts={"strategy": "tensor", "dynamic": False})
    (path / "config.json").write_text(json.dumps(data))
    moe = make_runner(path, load_format="dummy")._require_model().model.layers[0].mlp.experts
    assert moe.w13_weight.dtype == torch.float8_e4m3fn
    assert moe.fp8_layout is not None and not moe.fp8_layout.static_activations
