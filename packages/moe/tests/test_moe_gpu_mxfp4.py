"""GPU: the Triton MXFP4 grouped GEMM (plain and computing C^T = W A^T, each at every size) at gpt-oss-20b sizes
(H 2880, N 2880, 32 experts, top 4, bf16) against the torch reference on the same blocks, with and without
biases / swigluoai; expert parallelism's -1 ids; the oracle's choice; a FusedMoE with MXFP4 experts in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from moe_cases import check_graph_replays_layer
from mxfp4_cases import assert_close_to, run_mxfp4

from treadle_moe import FusedMoE
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, quantize_experts_mxfp4
from treadle_moe.mxfp4_layer import quantize_to_mxfp4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN, INTER, EXPERTS, TOP_K = 2880, 2880, 32, 4  # gpt-oss-20b
Experts = tuple[dict[str, torch.Tensor], Mxfp4ExpertScales]  # the blocks (and biases), their scales


@pytest.fixture(scope="module")
def experts() -> Experts:
    """Random experts of gpt-oss-20b's shapes quantized to MXFP4 on the GPU, and O(1) bf16 biases."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=gen) * HIDDEN**-0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", generator=gen) * INTER**-0.5
    b13, b2, scales = quantize_experts_mxfp4(w13, w2)
    biases = {
        "b13": torch.randn(EXPERTS, 2 * INTER, device="cuda", generator=gen).to(torch.bfloat16),
        "b2": (4 * torch.randn(EXPERTS, HIDDEN, device="cuda", generator=gen)).to(torch.bfloat16),
    }
    return {"w13": b13, "w2": b2, **biases}, scales


def _routed(experts: dict[str, torch.Tensor], tokens: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (4 * torch.randn(tokens, HIDDEN, device="cuda", generator=gen)).to(torch.bfloat16)
    top_logits, ids = torch.randn(tokens, EXPERTS, device="cuda", generator=gen).topk(TOP_K, dim=-1)
    return dict(experts, hidden=hidden, topk_weights=top_logits.softmax(-1), topk_ids=ids.to(torch.int32))


@pytest.mark.parametrize("tokens", [1, 7, 64, 512])
@pytest.mark.parametrize(("activation", "bias"), [("swigluoai", True), ("silu", False)])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_gpt_oss_20b_sizes_match_reference(
    experts: Experts, combo: str, activation: str, bias: bool, tokens: int, mxfp4_kernel: str
) -> None:
    weights, scales = experts
    inputs = _routed(weights, tokens, seed=tokens)
    epilogue = ExpertEpilogue(inputs["b13"], inputs["b2"]) if bias else None
    out = run_mxfp4(combo, inputs, scales, activation, epilogue)
    ref = run_mxfp4("standard-torch", inputs, scales, activation, epilogue)
    assert_close_to(out, ref, torch.bfloat16)


def test_other_ranks_experts_add_nothing(experts: Experts) -> None:
    weights, scales = experts
    inputs = _routed(weights, 64, seed=3)
    half = EXPERTS // 2
    local = torch.where(inputs["topk_ids"] >= half, -1, inputs["topk_ids"])
    held = dict(inputs, w13=inputs["w13"][:half], w2=inputs["w2"][:half], topk_ids=local)
    held_scales = Mxfp4ExpertScales(scales.w13_scale[:half], scales.w2_scale[:half])
    epilogue = ExpertEpilogue(inputs["b13"][:half], inputs["b2"][:half])
    out = run_mxfp4("standard-triton", held, held_scales, "swigluoai", epilogue, routed_experts=EXPERTS)
    ref = run_mxfp4("standard-torch", held, held_scales, "swigluoai", epilogue)
    assert_close_to(out, ref, torch.bfloat16)


def test_layer_picks_triton_and_replays_in_a_cuda_graph() -> None:
    moe = FusedMoE(EXPERTS, TOP_K, HIDDEN, INTER, dtype=torch.bfloat16, device="cuda", activation="swigluoai",
                   bias=True)  # fmt: skip
    torch.nn.init.normal_(moe.w13_weight, std=HIDDEN**-0.5)
    torch.nn.init.normal_(moe.w2_weight, std=INTER**-0.5)
    quantize_to_mxfp4(moe)
    x = (4 * torch.randn(8, HIDDEN, device="cuda")).to(torch.bfloat16)
    logits = torch.randn(8, EXPERTS, device="cuda")
    eager = moe(x, logits)
    assert "experts=triton_fused" in moe.describe() and "mxfp4" in moe.describe()
    check_graph_replays_layer(moe, x, logits, eager)
