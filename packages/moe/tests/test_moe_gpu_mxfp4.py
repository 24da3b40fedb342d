"""GPU: the Triton MXFP4 grouped GEMM (plain and computing C^T = W A^T, each at every size, with either weight
decode) at gpt-oss-20b sizes (H 2880, N 2880, 32 experts, top 4, bf16) against the torch reference on the same blocks,
with and without biases / swigluoai; the two decodes bit for bit; expert parallelism's -1 ids; the oracle's choice; a
FusedMoE with MXFP4 experts in a CUDA graph."""

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


@pytest.fixture(params=["bf16", "fp32"])
def decode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once per weight decode of the MXFP4 GEMM (experts/triton_mxfp4.py's `decode_kind`)."""
    monkeypatch.setenv("TREADLE_MXFP4_DECODE", request.param)
    return str(request.param)


# 1,024 tokens: 128 rows an expert, the prefill tile
@pytest.mark.parametrize("tokens", [1, 7, 64, 512, 1024])
@pytest.mark.parametrize(("activation", "bias"), [("swigluoai", True), ("silu", False)])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_gpt_oss_20b_sizes_match_reference(
    experts: Experts, combo: str, activation: str, bias: bool, tokens: int, mxfp4_kernel: str, decode: str
) -> None:
    weights, scales = experts
    inputs = _routed(weights, tokens, seed=tokens)
    epilogue = ExpertEpilogue(inputs["b13"], inputs["b2"]) if bias else None
    out = run_mxfp4(combo, inputs, scales, activation, epilogue)
    ref = run_mxfp4("standard-torch", inputs, scales, activation, epilogue)
    assert_close_to(out, ref, torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 64, 1024])
def test_bf16_decode_is_the_fp32_decode_bit_for_bit(
    experts: Experts, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both decodes give the exact weights, so the same tiles (the policy's for the bf16 decode) give the same bits:
    a flushed bf16 subnormal (code 1, 0.5) or a wrong nibble, sign or scale in the PTX shows here."""
    from treadle_moe.configs import BlockConfig
    from treadle_moe.experts.triton_mxfp4 import mxfp4_config

    weights, scales = experts
    inputs = _routed(weights, tokens, seed=tokens + 1)
    epilogue = ExpertEpilogue(inputs["b13"], inputs["b2"])
    tiles = mxfp4_config(
        BlockConfig(64, 64, 64, group_m=8), tokens, TOP_K, EXPERTS, source="tables", decode="bf16"
    )
    outs = []
    for kind in ("bf16", "fp32"):
        monkeypatch.setenv("TREADLE_MXFP4_DECODE", kind)
        outs.append(run_mxfp4("standard-triton", inputs, scales, "swigluoai", epilogue, block_config=tiles))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].abs().max() > 0


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
