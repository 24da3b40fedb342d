"""4-bit checkpoints treadle cannot load are refused with the reason: config.json fields (naming config.json, the field
and its value), files that disagree with their config.json (naming the tensor as the files spell it), a
--quantization naming another method. And what does load: vLLM's method names, dummy weights with a 4-bit
config.json (random codes and scales, the 4-bit kernels running; a mixture-of-experts model's experts 4-bit too:
test_quantization_int4_moe.py), LoRA adapters on a 4-bit base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from fp8_checkpoints import read_checkpoint, write_checkpoint
from int4_checkpoints import FORMATS, dequantized_reference, quantization_config, write_int4_checkpoint
from test_models import COMMON
from test_runner_fakes import FakeScheduler, make_runner, perturb_, record_hidden

from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.loader import make_dummy_model_dir
from treadle_model_runner.quantization import weight_bytes

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}


def _ct(weights: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A compressed-tensors W4A16 quantization_config with fields replaced."""
    args = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": 32,
        **(weights or {}),
    }
    group = {"targets": ["Linear"], "weights": args, "input_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": group},
            "ignore": ["lm_head"], **top}  # fmt: skip


def _two_groups(second: dict[str, Any]) -> dict[str, Any]:
    quant = _ct()
    group = dict(quant["config_groups"]["group_0"], targets=["re:.*down_proj"])
    quant["config_groups"]["group_1"] = {**group, "weights": {**group["weights"], **second}}
    return quant


REFUSED = {
    "awq 3-bit": ({**AWQ, "bits": 3}, r"quantization_config\.bits is 3: only 4-bit"),
    "awq w_bit": ({**AWQ, "bits": None, "w_bit": 8}, r"quantization_config\.w_bit is 8"),
    "awq gemv": ({**AWQ, "version": "gemv"}, r"quantization_config\.version is 'gemv'.*GEMM layout"),
    "awq exllama": ({**AWQ, "version": "exllama"}, r"quantization_config\.version is 'exllama'"),
    "awq without zero points": ({**AWQ, "zero_point": False}, r"quantization_config\.zero_point is False"),
    "awq without group size": ({**AWQ, "group_size": None}, r"quantization_config\.group_size is None"),
    "gptq 2-bit": ({**GPTQ, "bits": 2}, r"quantization_config\.bits is 2"),
    "gptq 8-bit": ({**GPTQ, "bits": 8}, r"quantization_config\.bits is 8"),
    "gptq marlin": ({**GPTQ, "checkpoint_format": "marlin"}, r"quantization_config\.checkpoint_format is 'marlin'"),
    "gptq lm_head": ({**GPTQ, "lm_head": True}, r"quantization_config\.lm_head is True.*lm_head in the model dtype"),
    "gptq override": ({**GPTQ, "dynamic": {r"+:.*down_proj": {"bits": 8}}}, r"quantization_config\.dynamic is"),
    "gptq group size": ({**GPTQ, "group_size": 0}, r"quantization_config\.group_size is 0"),
    "ct 4-bit activations": (_ct(), r"group_0\.input_activations is \{'num_bits': 4"),
    "ct mixed bits": (_two_groups({"num_bits": 8}), r"group_1\.weights\.num_bits is '8-bit int'"),
    "ct tensor strategy": (_ct({"strategy": "tensor"}), r"group_0\.weights\.strategy is 'tensor'"),
    "ct format": (_ct(format="naive-quantized"), r"quantization_config\.format is 'naive-quantized'"),
    "ct group size": (_ct({"group_size": None}), r"group_0\.weights\.group_size is None"),
    "ct groups differ": (_two_groups({"group_size": 64}), r"config_groups is \['group_0', 'group_1'\]"),
    "ct actorder": (_ct({"actorder": "sideways"}), r"group_0\.weights\.actorder is 'sideways'"),
}  # fmt: skip
REFUSED["ct 4-bit activations"][0]["config_groups"]["group_0"]["input_activations"] = {
    "num_bits": 4,
    "type": "int",
}


def _config_with(tmp_path: Path, quant: dict[str, Any], config: Any = None) -> Path:
    data = (config or tf.LlamaConfig(**COMMON)).to_dict()
    data["architectures"] = [data.get("architectures") or ["LlamaForCausalLM"]][0]
    data["quantization_config"] = quant
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case", list(REFUSED))
def test_unloadable_layouts_are_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    quant, match = REFUSED[case]
    path = _config_with(tmp_path, quant)
    with pytest.raises(ValueError, match=match) as info:
        make_runner(path, load_format="dummy")
    assert str(path / "config.json") in str(info.value)


def _edited(tmp_path: Path, fmt: str, edit: Any) -> Path:
    """A tiny Llama 4-bit checkpoint whose tensors (and quantization_config) `edit(tensors, quant)` changed."""
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    path = tmp_path / "ckpt"
    write_int4_checkpoint(hf, path, FORMATS[fmt])
    tensors, quant = read_checkpoint(path), quantization_config(FORMATS[fmt])
    edit(tensors, quant)
    for file in path.glob("*.safetensors*"):
        file.unlink()
    write_checkpoint(hf, path, tensors, quant)
    return path


def _swap_g_idx(tensors: dict[str, torch.Tensor], quant: dict[str, Any]) -> None:
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()


MISMATCHED = {
    "missing zero points": ("awq", lambda t, q: t.pop("model.layers.0.self_attn.k_proj.qzeros"),
                            r"missing model\.layers\.0\.self_attn\.k_proj\.qzeros: .*qweight, qzeros, scales"),
    "projection missing": ("gptq", lambda t, q: [t.pop(f"model.layers.1.mlp.up_proj.{s}")
                                                 for s in ("qweight", "qzeros", "scales", "g_idx")],
                           r"missing 2 tensors .*up_proj\.group_scale, .*up_proj\.packed_weight.*4-bit"),
    "ignored but 4-bit": ("awq", lambda t, q: q.update(modules_to_not_convert=["o_proj"]),
                          r"'model\.layers\.0\.self_attn\.o_proj\.qweight' is part of a 4-bit projection.*leaves "
                          r"model\.layers\.0\.self_attn\.o_proj unquantized"),
    "quantized lm_head": ("ct-sym", lambda t, q: t.update({"lm_head.weight_packed": torch.zeros(160, 8).int()}),
                          r"'lm_head\.weight_packed' is part of a 4-bit projection.*lm_head"),
    "split stacked layer": ("ct-asym", lambda t, q: q["ignore"].append("model.layers.1.self_attn.k_proj"),
                            r"makes .*q_proj.*v_proj 4-bit but leaves model\.layers\.1\.self_attn\.k_proj "
                            r"unquantized.*quantize all of them or none"),
    "wrong shape": ("gptq", lambda t, q: t.update({"model.layers.0.mlp.down_proj.qweight":
                                                   t["model.layers.0.mlp.down_proj.qweight"][:8]}),
                    r"'model\.layers\.0\.mlp\.down_proj\.packed_weight' has shape \(8, 64\).*expects \(16, 64\)"),
    "g_idx out of range": ("gptq-act-order", lambda t, q: t["model.layers.0.mlp.up_proj.g_idx"].fill_(9),
                           r"up_proj: g_idx names groups outside the 2 of its scales"),
    "stacked g_idx differ": ("gptq-act-order", _swap_g_idx,
                             r"'model\.layers\.0\.self_attn\.[qk]_proj\.group_index' orders the input rows "
                             r"differently from the [qk] projection's"),
    "ct weight_shape": ("ct-sym", lambda t, q: t.update({"model.layers.0.mlp.up_proj.weight_shape":
                                                         torch.tensor([128, 72])}),
                        r"up_proj: weight_shape \(128, 72\) is not weight_packed's \(128, 64\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_files_that_disagree_with_config_json_are_refused(tmp_path: Path, case: str) -> None:
    fmt, edit, match = MISMATCHED[case]
    path = _edited(tmp_path, fmt, edit)
    with pytest.raises(ValueError, match=match):
        make_runner(path)


def test_vllm_method_names_load_the_same_and_others_are_refused(tmp_path: Path) -> None:
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    write_int4_checkpoint(hf, tmp_path, FORMATS["awq"])
    auto = make_runner(tmp_path)._require_model()
    for name in ("awq", "awq_marlin"):
        named = make_runner(tmp_path, quantization=name)._require_model()
        for a, b in zip(auto.parameters(), named.parameters(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    for name in ("fp8", "gptq", "compressed-tensors"):
        with pytest.raises(
            ValueError, match=rf"quantization '{name}' was requested.*4-bit checkpoint \(awq.*pass awq"
        ):
            make_runner(tmp_path, quantization=name)
    plain = make_dummy_model_dir(tf.LlamaConfig(**COMMON), tmp_path / "plain")
    with pytest.raises(
        ValueError, match=r"quantization 'gptq' names a checkpoint format.*no quantization_config"
    ):
        make_runner(plain, quantization="gptq", load_format="dummy")


def test_moe_int4_checkpoints_load_with_4bit_experts(tmp_path: Path) -> None:
    """Once refused (no 4-bit expert path): the experts now hold 4-bit codes in the stacked expert layout."""
    config = tf.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config.architectures = ["Qwen3MoeForCausalLM"]
    path = _config_with(tmp_path, AWQ, config)
    model = make_runner(path, load_format="dummy")._require_model()
    moe = model.model.layers[0].mlp.experts
    assert moe.int4_layout is not None and moe.w13_weight.dtype == torch.int32


DUMMY = {
    "awq": (AWQ, True, False),
    "gptq": ({**GPTQ, "desc_act": True, "sym": False}, True, True),
    "ct": (_ct(), False, False),
}  # quantization_config, zero points, act order


@pytest.mark.parametrize("case", list(DUMMY))
def test_dummy_weights_with_a_4bit_config_run_the_4bit_projections(tmp_path: Path, case: str) -> None:
    """--load-format dummy with a 4-bit config.json: every projection holds random 4-bit codes (zero points and act
    order as the config says), weighs about an eighth of fp32 plus scales, and the model decodes."""
    quant, zeros, act_order = DUMMY[case]
    path = _config_with(tmp_path, quant)
    runner = make_runner(path, load_format="dummy")
    assert runner.quantization is not None and runner.quantization.method == "w4a16"
    assert runner.describe()["quantization"].startswith("4-bit checkpoint")
    model = runner._require_model()
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and all(m.packed_weight is not None and m.weight is None for m in layers)
    assert all(
        (m.group_zero is not None) == zeros and (m.group_index is not None) == act_order for m in layers
    )
    plain = make_runner(
        make_dummy_model_dir(tf.LlamaConfig(**COMMON), tmp_path / "plain"), load_format="dummy"
    )
    packed = sum(m.packed_weight.numel() * 4 for m in layers)  # type: ignore[union-attr]
    assert (
        weight_bytes(plain._require_model()) - weight_bytes(model) > 6 * packed
    )  # 8x packed, less the scales
    hidden = record_hidden(runner)
    sched = FakeScheduler(runner, seed=1)
    sched.add("r0", [5, 9, 13], max_tokens=4)
    assert len(sched.run(budget=8)["r0"]) == 4
    # weights of the dummy loader's size: the hidden states stay finite and of order one
    assert all(bool(torch.isfinite(h).all()) and 0.05 < float(h.std()) < 20 for h in hidden)


def test_lora_runs_on_a_4bit_base(tmp_path: Path) -> None:
    """An adapter on every projection of a GPTQ act-order Llama: greedy tokens equal PEFT's on the dequantized
    reference, with the adapter and without."""
    from lora_fixtures import PeftReference, save_adapter

    from treadle_model_runner import LoRAConfig
    from treadle_model_runner.lora import LoRARequest

    # base weights from a fixed seed, not the global RNG's state: greedy parity needs no near-tie in the top logits
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)).eval()
    perturb_(hf, seed=4, std=0.15)
    dequantized = write_int4_checkpoint(hf, tmp_path / "base", FORMATS["gptq-asym-act-order"])
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = save_adapter(hf, tmp_path / "a", seed=2, r=8, alpha=16, targets=targets)
    peft = PeftReference(dequantized_reference(hf, dequantized), {"a": adapter})
    runner = make_runner(
        tmp_path / "base", lora_config=LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=8)
    )
    prompt = torch.randint(1, 160, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    sched = FakeScheduler(runner, seed=1)
    sched.add("a", prompt, max_tokens=6, lora_request=LoRARequest("a", 1, str(adapter)))
    sched.add("base", prompt, max_tokens=6)
    got = sched.run(budget=32)
    assert got["a"] == peft.greedy("a", prompt, 6)
    assert got["base"] == peft.greedy(None, prompt, 6)
