"""4-bit (W4A16) mixture-of-experts checkpoints against an independent reference (CPU, fp32).

Tiny random Qwen3-MoE (a dense layer from `mlp_only_layers`, q/k norms), Mixtral (`block_sparse_moe`, w1/w3/w2) and
Qwen2-MoE (a shared expert and its gate) are written in the test as GPTQ, AWQ and compressed-tensors checkpoints
one projection per expert, as Qwen3-30B-A3B-GPTQ-Int4 is (int4_checkpoints.py: packing written from the formats'
layouts; the router stays fp32): GPTQ symmetric, GPTQ v1 asymmetric with act order (desc_act), gptq_v2, AWQ and
compressed-tensors asymmetric. The runner loads each with no --quantization, and:
- a mixed step's logits are within 1e-4 of the HF model running the weights the files dequantize to, far from the
  unquantized model's; greedy continuations equal that reference's `generate`;
- the experts hold 4-bit codes (int32 words) whose dequantization is exactly the reference's expert weights; the
  router stays fp32;
- dummy weights for such a config.json give 4-bit experts and the model decodes;
- an AWQ checkpoint leaving one layer's experts unquantized (modules_to_not_convert) loads them fp32.
Refused by name: a checkpoint quantizing some experts of a layer but not others, a tensor-parallel cut of the
experts' down projection inside a group (naming group_size and moe_intermediate_size), and files whose expert gate
and up projections disagree on their act order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from int4_checkpoints import FORMATS, Int4Format, dequantized_reference, write_int4_checkpoint
from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
from test_quantization_fp8_moe import _hf
from test_runner_fakes import make_runner

from treadle_ir.ops.int4 import dequantize_int4
from treadle_model_runner.loader import make_dummy_model_dir
from treadle_model_runner.models import sparse_moe
from treadle_model_runner.parallel import TensorParallel
from treadle_model_runner.quantization.int4_checkpoint import allocate_projections
from treadle_model_runner.quantization.int4_scheme import parse_int4_config
from treadle_moe import FusedMoE, Int4Layout

CASES = {
    "qwen3-moe-gptq": ("qwen3_moe", 64, "gptq"),
    "qwen3-moe-gptq-asym-act-order": ("qwen3_moe", 64, "gptq-asym-act-order"),
    "qwen3-moe-awq": ("qwen3_moe", 32, "awq"),
    "qwen3-moe-ct-asym": ("qwen3_moe", 64, "ct-asym"),
    "mixtral-gptq-act-order": ("mixtral", 32, "gptq-act-order"),
    "qwen2-moe-gptq-v2": ("qwen2_moe", 32, "gptq-v2"),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    arch, inter, fmt = CASES[request.param]
    hf = _hf(arch, inter)
    path = tmp_path_factory.mktemp(request.param)
    dequantized = write_int4_checkpoint(hf, path, FORMATS[fmt])
    return hf, dequantized, path, dequantized_reference(hf, dequantized)


def test_mixed_batch_logits_match_the_dequantized_reference(checkpoint: tuple[Any, ...]) -> None:
    hf, _, path, ref = checkpoint
    check_mixed_batch_logits(make_runner(path), ref, hf)


def test_greedy_continuations_match_the_dequantized_reference(checkpoint: tuple[Any, ...]) -> None:
    _, _, path, ref = checkpoint
    check_greedy_continuations(make_runner(path, max_num_batched_tokens=16), ref)


def test_experts_hold_the_files_codes(checkpoint: tuple[Any, ...]) -> None:
    hf, dequantized, path, _ = checkpoint
    runner = make_runner(path)
    assert runner.quantization is not None and runner.quantization.method == "w4a16"
    model = runner._require_model()
    mixtral = "Mixtral" in type(hf).__name__
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedMoE)]
    assert layers
    for name, moe in layers:
        layout = moe.int4_layout
        assert layout is not None and moe.w13_weight.dtype == torch.int32, name
        prefix = name.replace(".mlp.", ".block_sparse_moe.") if mixtral else name
        s = moe.int4_scales()
        assert s is not None
        for e in range(moe.num_experts):
            gate, up, down = (dequantized[f"{prefix}.{e}.{p}"] for p in names)
            scale, zero, g_idx = s.expert(e, "w13")
            w13 = dequantize_int4(
                moe.w13_weight[e], scale, zero, g_idx, layout.group_size_of(moe.hidden_size)
            )
            assert torch.equal(w13.t(), torch.cat([gate, up])), (name, e)
            scale, zero, g_idx = s.expert(e, "w2")
            w2 = dequantize_int4(
                moe.w2_weight[e], scale, zero, g_idx, layout.group_size_of(moe.intermediate_size)
            )
            assert torch.equal(w2.t(), down), (name, e)
        router = model.get_submodule(name.removesuffix(".experts") + ".gate")
        assert router.weight.dtype == torch.float32


def _config_dir(
    tmp_path: Path, fmt: Int4Format, arch: str = "qwen3_moe", inter: int = 64
) -> tuple[Any, Path]:
    from int4_checkpoints import quantization_config

    hf = _hf(arch, inter)
    path = make_dummy_model_dir(hf.config, tmp_path / "dummy")
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = quantization_config(fmt)
    (path / "config.json").write_text(json.dumps(data))
    return hf, path


@pytest.mark.parametrize("fmt", ["gptq-asym-act-order", "awq"])
def test_dummy_weights_for_a_4bit_moe_config(tmp_path: Path, fmt: str) -> None:
    _, path = _config_dir(tmp_path, FORMATS[fmt])
    runner = make_runner(path, load_format="dummy")
    moe = runner._require_model().model.layers[1].mlp.experts
    layout = FORMATS[fmt]
    assert moe.int4_layout == Int4Layout(layout.group_size, not layout.symmetric, layout.act_order)
    assert moe.w13_weight.dtype == torch.int32 and tuple(moe.w13_weight.shape) == (8, 64 // 8, 128)
    from test_runner_fakes import FakeScheduler

    sched = FakeScheduler(runner, seed=1)
    sched.add("r0", [5, 9, 13], max_tokens=4)
    assert len(sched.run(budget=8)["r0"]) == 4


def test_experts_left_unquantized_load_in_the_model_dtype(tmp_path: Path) -> None:
    """AWQ's modules_to_not_convert naming one MoE layer's experts: they load fp32 beside 4-bit projections."""
    hf = _hf("qwen3_moe", 64)
    fmt = Int4Format("awq", ignore=("model.layers.1.mlp.experts",))
    dequantized = write_int4_checkpoint(hf, tmp_path, fmt)
    runner = make_runner(tmp_path)
    moe = runner._require_model().model.layers[1].mlp.experts
    assert moe.int4_layout is None and moe.w13_weight.dtype == torch.float32
    check_mixed_batch_logits(runner, dequantized_reference(hf, dequantized), hf)


def test_some_experts_quantized_and_others_not_is_refused(tmp_path: Path) -> None:
    hf = _hf("qwen3_moe", 64)
    fmt = Int4Format("gptq", symmetric=True, ignore=("model.layers.1.mlp.experts.3.down_proj",))
    _, path = _config_dir(tmp_path, fmt)
    with pytest.raises(
        ValueError, match=r"makes .*experts.0.gate_proj.* 4-bit but leaves .*experts.3.down_proj"
    ):
        make_runner(path, load_format="dummy")
    del hf


def test_tensor_parallel_cut_inside_a_group_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """moe_intermediate_size 64 in groups of 32 cut by 4 ranks: 16 down-projection rows per rank."""
    scheme = parse_int4_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                "sym": True}, "gptq", tmp_path / "config.json")  # fmt: skip
    monkeypatch.setattr(sparse_moe, "get_tp", lambda: TensorParallel(rank=1, size=4))
    monkeypatch.setattr(sparse_moe, "building_on_meta", lambda: True)
    block = sparse_moe.SparseMoeBlock(64, 8, 2, 64, True)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(64\) / tensor_parallel_size \(4\) = 16 .*"
                                         r"group_size \(32\); use tensor_parallel_size 1 or 2"):  # fmt: skip
        allocate_projections(block, scheme, torch.device("cpu"))
    act_order = parse_int4_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                   "sym": True}, "gptq", tmp_path / "config.json")  # fmt: skip
    allocate_projections(block, act_order, torch.device("cpu"))  # act order keeps every group: no cut
    assert tuple(block.experts.w2_group_scale.shape) == (8, 2, 64)


def test_gate_and_up_with_different_act_orders_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import int4_checkpoints

    shared_order = int4_checkpoints._input_order

    def order(name: str, k: int) -> torch.Tensor:  # each expert's up projection gets a row order of its own
        perm = shared_order(name, k)
        return perm.flip(0) if ".experts." in name and name.endswith("up_proj") else perm

    monkeypatch.setattr(int4_checkpoints, "_input_order", order)
    write_int4_checkpoint(_hf("qwen3_moe", 64), tmp_path, FORMATS["gptq-act-order"])
    with pytest.raises(
        ValueError, match=r"experts.\d+.up_proj.group_index' orders expert \d+'s input rows differently"
    ):
        make_runner(tmp_path)
