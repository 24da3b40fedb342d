"""fp8 experts with static (per-tensor) activation scales: per-channel weights (a checkpoint's per-tensor weight
scales broadcast to their rows), every row of the w13 input quantized with one scale, every row of the w2 input with
another, as `ops.fp8_linear` with that input_scale (values beyond 448 * scale saturate).

Against the spec written in the test (fp8_cases.moe_fp8_spec with the static scales): the torch reference, every
prepare/finalize x experts combo (Triton in the interpreter), a case whose input scales are small enough that a
part of the activations saturates, the layer loading per-expert input scales and folding them to their maximum (with
a warning when they differ), the layout's refusals and the oracle's description. GPU sizes: test_moe_gpu_fp8.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from fp8_cases import (
    assert_rows_close,
    calibrate,
    make_fp8_inputs,
    moe_fp8_spec,
    relative_error,
    with_static_inputs,
)
from moe_cases import COMBOS

from treadle_moe import Fp8ExpertScales, Fp8Layout, FusedMoE, ModularKernel, MoEProblem, select_moe_kernel
from treadle_moe.experts.fp8 import check_fp8_scales

CASE = (13, 48, 48, 8, 3)  # (tokens, hidden K, intermediate N, experts, top_k)
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _run(combo: str, inputs: dict[str, torch.Tensor], scales: Fp8ExpertScales) -> torch.Tensor:
    pf_cls, experts_cls, interpreted = COMBOS[combo]
    if interpreted:
        pytest.importorskip("triton")
    kernel = ModularKernel(pf_cls(), experts_cls())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    return kernel(*args, fp8=scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_reference_is_the_static_spec(dtype: torch.dtype) -> None:
    inputs, dynamic = make_fp8_inputs(None, *CASE, dtype, device="cpu", seed=1, skip_experts=2)
    static = with_static_inputs(dynamic, *calibrate(inputs, dynamic))
    got = _run("standard-torch", inputs, static)
    assert_rows_close(got, moe_fp8_spec(inputs, static), ROUNDING[dtype])
    # one scale for every token is not each token's own: the outputs differ by more than rounding
    assert relative_error(got, _run("standard-torch", inputs, dynamic)) > 2 * ROUNDING[dtype]


@pytest.mark.parametrize("combo", [c for c in COMBOS if c != "standard-torch"])
def test_matrix_static_fp32(combo: str) -> None:
    inputs, dynamic = make_fp8_inputs(None, *CASE, torch.float32, seed=7, skip_experts=2)
    static = with_static_inputs(dynamic, *calibrate(inputs, dynamic))
    assert_rows_close(
        _run(combo, inputs, static), _run("standard-torch", inputs, static), ROUNDING[torch.float32]
    )


@pytest.mark.parametrize("combo", list(COMBOS))
def test_small_input_scales_saturate(combo: str) -> None:
    """Input scales a quarter and a third of the calibrated ones: the larger activations clamp to +-448 * scale
    (the spec clamps them too), which the outputs show."""
    inputs, dynamic = make_fp8_inputs(None, *CASE, torch.float32, seed=3, skip_experts=2)
    s13, s2 = calibrate(inputs, dynamic)
    saturating = with_static_inputs(dynamic, s13 / 4, s2 / 3)
    x = inputs["hidden"].float().cpu()
    assert 0 < float((x.abs() > 448 * s13 / 4).float().mean()) < 0.5  # some activations saturate, not all
    got = _run(combo, inputs, saturating)
    assert_rows_close(got, moe_fp8_spec(inputs, saturating), ROUNDING[torch.float32])
    assert relative_error(got, _run("standard-torch", inputs, with_static_inputs(dynamic, s13, s2))) > 0.05


def test_layer_loads_per_expert_input_scales_and_folds_them_to_the_max(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inputs, dynamic = make_fp8_inputs(None, 5, 48, 32, 4, 2, torch.float32, device="cpu", seed=2)
    s13, s2 = calibrate(inputs, dynamic)
    layer = FusedMoE(4, 2, 48, 32, dtype=torch.float32, device="meta")
    layer.allocate_fp8(Fp8Layout(static_activations=True), device="cpu")
    for e in range(4):
        layer.weight_loader(layer.w13_weight, inputs["w13"][e, :32], "w", "w1", e)
        layer.weight_loader(layer.w13_weight, inputs["w13"][e, 32:], "w", "w3", e)
        layer.weight_loader(layer.w2_weight, inputs["w2"][e], "w", "w2", e)
        for shard, rows in (("w1", slice(0, 32)), ("w3", slice(32, 64))):
            layer.weight_loader(layer.w13_weight_scale, dynamic.w13[e, rows], "s", shard, e)  # type: ignore[arg-type]
            # per expert (and gate / up) calibrations, the largest being expert 2's up: 0-d, as fp8 checkpoints
            scale = torch.tensor(s13 * (1.0 if (e, shard) == (2, "w3") else 0.5 + 0.1 * e))
            layer.weight_loader(layer.w13_input_scale, scale, "i", shard, e)  # type: ignore[arg-type]
        layer.weight_loader(layer.w2_weight_scale, dynamic.w2[e], "s", "w2", e)  # type: ignore[arg-type]
        layer.weight_loader(layer.w2_input_scale, torch.tensor([s2 * (1.0 if e == 0 else 0.7)]), "i", "w2", e)  # type: ignore[arg-type]
    x = inputs["hidden"]
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="treadle_moe"):
        out = layer(x, logits)
    assert "static input scales of the experts differ" in caplog.text
    folded = layer.fp8_scales()
    assert folded is not None and folded.w13_input is not None and folded.w2_input is not None
    assert folded.w13_input.tolist() == [torch.tensor(s13).item()] and folded.w2_input.tolist() == [
        torch.tensor(s2).item()
    ]
    weights, ids = layer.router.select(logits, None)
    routed = {**inputs, "topk_weights": weights, "topk_ids": ids}
    assert_rows_close(out, moe_fp8_spec(routed, with_static_inputs(dynamic, s13, s2)), 1e-5)
    # loading an input scale again unfolds: the next forward takes the new maximum
    layer.weight_loader(layer.w2_input_scale, torch.tensor(4 * s2), "i", "w2", 3)  # type: ignore[arg-type]
    layer(x, logits)
    assert layer.fp8_scales().w2_input.tolist() == [torch.tensor(4 * s2).item()]  # type: ignore[union-attr]


def test_static_layout_refusals_and_the_oracle_description(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"block-wise fp8 experts quantize activations dynamically"):
        Fp8Layout((128, 128), static_activations=True)
    inputs, dynamic = make_fp8_inputs(None, *CASE, torch.float32, device="cpu")
    missing = Fp8ExpertScales(dynamic.w13, dynamic.w2, Fp8Layout(static_activations=True))
    with pytest.raises(
        ValueError, match=r"static per-tensor activations\) needs a float32 \[1\] w13_input scale"
    ):
        check_fp8_scales(inputs["w13"], inputs["w2"], missing)
    stray = Fp8ExpertScales(dynamic.w13, dynamic.w2, dynamic.layout, torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match=r"w13_input scale given, but .* quantizes dynamically"):
        check_fp8_scales(inputs["w13"], inputs["w2"], stray)
    layer = FusedMoE(4, 2, 48, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"static activation scales come from a calibrated checkpoint"):
        layer.quantize_fp8(Fp8Layout(static_activations=True))
    monkeypatch.delenv("TREADLE_MOE_BACKEND", raising=False)
    problem = MoEProblem(
        8, 2, 64, 32, torch.float32, torch.device("cpu"), fp8=Fp8Layout(static_activations=True)
    )
    text = select_moe_kernel(problem).describe()
    assert "fp8 w8a8 per-channel (weight scale per output row, static per-tensor activations)" in text
