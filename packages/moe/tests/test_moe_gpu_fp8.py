"""GPU: fp8 Triton fused MoE at Qwen3-30B-A3B sizes (hidden 2048, moe_intermediate 768, 128 experts, top-8) against
the torch reference (the dense IR fp8 ops per expert), both layouts and per-channel weights with static input scales
(calibrated on the tokens, and a quarter of that: saturating), 1 to 4096 tokens; the layer's oracle choice and
CUDA-graph capture (static scales loaded per expert too). Rows are compared with `assert_rows_close` (fp8_cases.py): each within 1e-2 of its norm
(bf16 rounding of the outputs), allowing the rare token whose intermediate rounds to the other e4m3 neighbour.
"""

from __future__ import annotations

import pytest
import torch
from fp8_cases import assert_rows_close, calibrate, make_fp8_inputs, relative_error, with_static_inputs
from moe_cases import check_graph_replays_layer, make_moe_inputs, run_combo

from treadle_moe import (
    Fp8Layout,
    FusedMoE,
    ModularKernel,
    NoEPStandardPrepareFinalize,
    TorchExperts,
    TritonExperts,
)

pytestmark = pytest.mark.gpu

K, N, E, TOP_K = 2048, 768, 128, 8
LAYOUTS = {"channel": None, "block128": (128, 128)}


def _run(experts: type, inputs: dict[str, torch.Tensor], scales: object) -> torch.Tensor:
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), experts())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    return kernel(*args, fp8=scales)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", [1, 7, 64, 256, 1024, 4096])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_real_size_fp8_matches_reference(layout: str, tokens: int) -> None:
    inputs, scales = make_fp8_inputs(
        LAYOUTS[layout], tokens, K, N, E, TOP_K, torch.bfloat16, "cuda", seed=tokens
    )
    out, ref = _run(TritonExperts, inputs, scales), _run(TorchExperts, inputs, scales)
    assert_rows_close(out, ref, 1e-2, min_fraction=0.9)
    if tokens >= 64:  # and it is the fp8 MoE: a few % from the unquantized one
        plain = make_moe_inputs(tokens, K, N, E, TOP_K, torch.bfloat16, "cuda", seed=tokens)
        assert 0.01 < relative_error(out, run_combo("standard-torch", plain)) < 0.15


@pytest.mark.parametrize("tokens", [1, 7, 256, 4096])
@pytest.mark.parametrize("saturate", [1.0, 0.25], ids=["calibrated", "saturating"])
def test_real_size_static_fp8_matches_reference(saturate: float, tokens: int) -> None:
    inputs, dynamic = make_fp8_inputs(None, tokens, K, N, E, TOP_K, torch.bfloat16, "cuda", seed=tokens)
    s13, s2 = calibrate(inputs, dynamic)
    scales = with_static_inputs(dynamic, s13 * saturate, s2 * saturate)
    out, ref = _run(TritonExperts, inputs, scales), _run(TorchExperts, inputs, scales)
    assert_rows_close(out, ref, 1e-2, min_fraction=0.9)


@pytest.mark.parametrize("layout", [*LAYOUTS, "static"])
def test_fp8_layer_picks_triton_and_captures_in_cuda_graph(layout: str) -> None:
    layer = FusedMoE(E, TOP_K, K, N, dtype=torch.bfloat16, device="cuda")
    torch.nn.init.normal_(layer.w13_weight, std=K**-0.5)
    torch.nn.init.normal_(layer.w2_weight, std=N**-0.5)
    x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    if layout == "static":  # per-channel weights, input scales loaded per expert (gate, up; down)
        layer.quantize_fp8(Fp8Layout())
        w13, w2, s13, s2 = layer.w13_weight, layer.w2_weight, layer.w13_weight_scale, layer.w2_weight_scale
        layer.allocate_fp8(Fp8Layout(static_activations=True), "cuda")
        for param, value in ((layer.w13_weight, w13), (layer.w2_weight, w2), (layer.w13_weight_scale, s13),
                             (layer.w2_weight_scale, s2)):  # fmt: skip
            param.data.copy_(value)
        for e in range(E):
            for shard in ("w1", "w3"):
                layer.weight_loader(layer.w13_input_scale, torch.tensor(4.0 / 448), "i", shard, e)  # type: ignore[arg-type]
            layer.weight_loader(layer.w2_input_scale, torch.tensor(0.5 / 448), "i", "w2", e)  # type: ignore[arg-type]
    else:
        layer.quantize_fp8(Fp8Layout(LAYOUTS[layout]))
    logits = torch.randn(64, E, device="cuda")
    eager = layer(x, logits)
    assert "triton_fused" in layer.describe() and "fp8 tensor cores" in layer.describe()
    check_graph_replays_layer(layer, x, logits, eager)
