"""GPU: W4A16 Triton fused MoE at Qwen3-30B-A3B sizes (hidden 2048, moe_intermediate 768, 128 experts, top-8,
groups of 128) against the spec written in the test (int4_cases.py), symmetric, asymmetric and act order, 1 to 4096
tokens; the layer's oracle choice and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from int4_cases import GPU_LAYOUTS, make_int4_inputs, moe_int4_spec
from moe_cases import check_graph_replays_layer

from treadle_moe import FusedMoE, Int4Layout, ModularKernel, NoEPStandardPrepareFinalize, TritonExperts
from treadle_moe.int4_layer import quantize_int4

pytestmark = pytest.mark.gpu

K, N, E, TOP_K = 2048, 768, 128, 8


@pytest.mark.parametrize("tokens", [1, 7, 64, 256, 1024, 4096])
@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
def test_real_size_int4_matches_the_spec(layout: str, tokens: int) -> None:
    inputs, scales = make_int4_inputs(layout, tokens, K, N, E, TOP_K, torch.bfloat16, "cuda", seed=tokens)
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TritonExperts())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    out = kernel(*args, int4=scales)
    spec = moe_int4_spec(inputs)
    # bf16 outputs of the two projections, summed in another order: within bf16 rounding of the norm
    assert float((out.float() - spec.float()).norm() / spec.float().norm()) < 1e-2


def test_int4_layer_picks_triton_and_captures_in_cuda_graph() -> None:
    layer = FusedMoE(E, TOP_K, K, N, dtype=torch.bfloat16, device="cuda")
    torch.nn.init.normal_(layer.w13_weight, std=K**-0.5)
    torch.nn.init.normal_(layer.w2_weight, std=N**-0.5)
    quantize_int4(layer, Int4Layout(128, True, False))
    x = torch.randn(64, K, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(64, E, device="cuda")
    eager = layer(x, logits)
    assert "triton_fused" in layer.describe() and "unpacked in registers" in layer.describe()
    check_graph_replays_layer(layer, x, logits, eager)
