"""fp8 mixture-of-experts checkpoints with per-tensor (or per-channel) weight scales and static activation scales,
against an independent reference (CPU, fp32).

Tiny random Mixtral (`block_sparse_moe`, w1/w3/w2), Qwen3-MoE (a dense layer from `mlp_only_layers`) and Qwen2-MoE (a
shared expert) are written in the test one matrix per expert (fp8_moe_checkpoints.py), like
Mixtral-8x7B-Instruct-v0.1-FP8 (quant_method fp8, activation_scheme static: per expert `w1/w2/w3.weight_scale` and
`input_scale`, 0-d) and compressed-tensors FP8 (static per-tensor input, "tensor" or "channel" weights): each
expert's input scales calibrated apart, so they differ across experts. The runner loads each with no --quantization:
- a step mixing a chunked prefill, a fresh prefill and decodes gives logits within 1e-4 of the reference
  (fp8_moe_reference.py: the files' e4m3 values and scales, each expert input quantized with the largest input scale
  of its layer and GEMM, saturating; the dense projections with theirs), far from the unquantized model's (at most
  2 of its 26 positions within 5e-3 instead: an activation rounded to the other e4m3 neighbour); greedy equal;
- the experts hold the files' bytes, per-tensor weight scales broadcast to their rows (gate's and up's apart), and
  every expert's input scales, folded to their maximum with a warning;
- input scales a quarter of the calibrated ones saturate some expert activations in the runner's forward, and the
  logits still match the reference; per-tensor dynamic Mixtral loads likewise; dummy weights for a static config
  load (quantized online, per channel, dynamic).
Refused by tensor name: a missing expert input scale, an input scale of more than one value, expert input scales in
a checkpoint whose config.json says dynamic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from fp8_checkpoints import Fp8Format, quantization_config, write_checkpoint
from fp8_moe_checkpoints import moe_fp8_tensors
from fp8_moe_reference import moe_channel_reference
from test_quantization_fp8 import check_greedy_continuations, check_mixed_batch_logits
from test_quantization_fp8_moe import _hf
from test_runner_fakes import make_runner

from treadle_model_runner.loader import make_dummy_model_dir
from treadle_moe import FusedMoE

CASES = {
    "mixtral-fp8-static": ("mixtral", Fp8Format("fp8", "tensor", static=True, num_shards=2)),
    "qwen3-moe-ct-tensor-static": ("qwen3_moe", Fp8Format("compressed-tensors", "tensor", static=True)),
    "qwen3-moe-ct-channel-static": ("qwen3_moe", Fp8Format("compressed-tensors", "channel", static=True)),
    "qwen2-moe-fp8-static": ("qwen2_moe", Fp8Format("fp8", "tensor", static=True)),
    "mixtral-fp8-dynamic": ("mixtral", Fp8Format("fp8", "tensor", static=False)),
}


def _write(
    arch: str, fmt: Fp8Format, path: Path, saturate: float = 1.0
) -> tuple[Any, dict[str, torch.Tensor]]:
    hf = _hf(arch)
    tensors = moe_fp8_tensors(hf, fmt, saturate)
    write_checkpoint(hf, path, tensors, quantization_config(fmt), fmt.num_shards)
    return hf, tensors


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, ...]:
    arch, fmt = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf, tensors = _write(arch, fmt, path)
    return hf, fmt, tensors, path, moe_channel_reference(hf, tensors)


def test_mixed_batch_logits_match_the_static_reference(checkpoint: tuple[Any, ...]) -> None:
    hf, _, _, path, ref = checkpoint
    check_mixed_batch_logits(make_runner(path), ref, hf, max_flipped=2)


def test_greedy_continuations_match_the_static_reference(checkpoint: tuple[Any, ...]) -> None:
    _, _, _, path, ref = checkpoint
    check_greedy_continuations(make_runner(path, max_num_batched_tokens=16), ref)


def _layers(hf: Any, model: Any) -> list[tuple[str, str, tuple[str, ...], FusedMoE]]:
    """(treadle name, checkpoint prefix, gate/up/down names, layer) of every FusedMoE."""
    mixtral = "Mixtral" in type(hf).__name__
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if mixtral else "mlp"
    layers = [(n, n.replace(".mlp.", f".{block}."), names, m) for n, m in model.named_modules()
              if isinstance(m, FusedMoE)]  # fmt: skip
    assert layers
    return layers


def test_experts_hold_the_files_bytes_scales_and_folded_input_scales(
    checkpoint: tuple[Any, ...], caplog: pytest.LogCaptureFixture
) -> None:
    hf, fmt, files, path, _ = checkpoint
    with caplog.at_level(logging.WARNING, logger="treadle_moe"):
        model = make_runner(path)._require_model()  # the loader folds the input scales
    assert ("static input scales of the experts differ" in caplog.text) == fmt.static
    for name, prefix, names, moe in _layers(hf, model):
        layout = moe.fp8_layout
        assert layout is not None and layout.block is None and layout.static_activations == fmt.static, name
        n = moe.intermediate_size
        for e in range(moe.num_experts):
            gate, up, down = (f"{prefix}.{e}.{p}" for p in names)
            w13 = torch.cat([files[f"{gate}.weight"], files[f"{up}.weight"]]).view(torch.uint8)
            assert torch.equal(moe.w13_weight[e].view(torch.uint8), w13), (name, e)
            assert torch.equal(moe.w2_weight[e].view(torch.uint8), files[f"{down}.weight"].view(torch.uint8))
            rows = [files[f"{p}.weight_scale"].reshape(-1).expand(r) for p, r in ((gate, n), (up, n))]
            assert torch.equal(moe.w13_weight_scale[e], torch.cat(rows)), (name, e)  # type: ignore[index]
            down_rows = files[f"{down}.weight_scale"].reshape(-1).expand(moe.hidden_size)
            assert torch.equal(moe.w2_weight_scale[e], down_rows), (name, e)  # type: ignore[index]
        if not fmt.static:
            continue
        scales = moe.fp8_scales()
        assert scales is not None and scales.w13_input is not None and scales.w2_input is not None
        w13_inputs = [
            files[f"{prefix}.{e}.{p}.input_scale"] for e in range(moe.num_experts) for p in names[:2]
        ]
        w2_inputs = [files[f"{prefix}.{e}.{names[2]}.input_scale"] for e in range(moe.num_experts)]
        assert torch.equal(scales.w13_input, torch.stack(w13_inputs).float().amax().reshape(1)), name
        assert torch.equal(scales.w2_input, torch.stack(w2_inputs).float().amax().reshape(1)), name


def test_small_input_scales_saturate_and_match_the_reference(tmp_path: Path) -> None:
    hf, tensors = _write("qwen3_moe", Fp8Format("fp8", "tensor", static=True), tmp_path, saturate=0.25)
    runner = make_runner(tmp_path)
    saturated: list[float] = []

    def record(moe: FusedMoE, args: tuple[torch.Tensor, ...]) -> None:
        scales = moe.fp8_scales()
        assert scales is not None and scales.w13_input is not None
        saturated.append(float((args[0].abs() > 448 * scales.w13_input).float().mean()))

    for _, _, _, moe in _layers(hf, runner._require_model()):
        moe.register_forward_pre_hook(record)
    check_mixed_batch_logits(runner, moe_channel_reference(hf, tensors), hf, max_flipped=2)
    assert saturated and max(saturated) > 0.001, saturated  # some expert inputs beyond 448 * scale


def test_dummy_weights_for_a_static_moe_config_quantize_online(tmp_path: Path) -> None:
    """Random weights have no calibrated input scales: the experts are quantized per channel, dynamically (as the
    dense projections of such a config; before, static MoE configs were refused outright)."""
    path = make_dummy_model_dir(_hf("mixtral").config, tmp_path / "static")
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (path / "config.json").write_text(json.dumps(data))
    model = make_runner(path, load_format="dummy")._require_model()
    moe = model.model.layers[1].mlp.experts
    assert moe.w13_weight.dtype == torch.float8_e4m3fn
    assert (
        moe.fp8_layout is not None and moe.fp8_layout.block is None and not moe.fp8_layout.static_activations
    )


def test_a_missing_or_malformed_expert_input_scale_is_named(tmp_path: Path) -> None:
    fmt = Fp8Format("fp8", "tensor", static=True)
    hf = _hf("mixtral")
    tensors = moe_fp8_tensors(hf, fmt)
    dropped = "model.layers.1.block_sparse_moe.experts.2.w3.input_scale"
    kept = tensors.pop(dropped)
    write_checkpoint(hf, tmp_path / "missing", tensors, quantization_config(fmt))
    with pytest.raises(ValueError, match=rf"missing 1 expert tensors for MixtralForCausalLM: {dropped}"):
        make_runner(tmp_path / "missing")
    tensors[dropped] = kept.reshape(1).expand(2).clone()
    write_checkpoint(hf, tmp_path / "two", tensors, quantization_config(fmt))
    with pytest.raises(ValueError, match=rf"{dropped} \(expert 2, w3\) has shape \(2,\), expected \(\)"):
        make_runner(tmp_path / "two")


def test_expert_input_scales_with_a_dynamic_config_are_named(tmp_path: Path) -> None:
    hf = _hf("mixtral")
    tensors = {n: t for n, t in moe_fp8_tensors(hf, Fp8Format("fp8", "tensor", static=True)).items()
               if ".experts." in n or not n.endswith(".input_scale")}  # fmt: skip
    write_checkpoint(hf, tmp_path, tensors, quantization_config(Fp8Format("fp8", "tensor", static=False)))
    with pytest.raises(ValueError, match=(
        r"block_sparse_moe\.experts\.\d+\.w[123]\.input_scale' is a static activation scale, but treadle's "
        r"MixtralForCausalLM experts quantize their activations dynamically")):  # fmt: skip
        make_runner(tmp_path)
