"""Expert biases and the swigluoai activation (experts/epilogue.py) in every experts x prepare/finalize combination,
against bias_cases.py's per-token float64 loop (HF GptOssExperts' math on plain halves); and the refusals of quantized
experts for such layers. Triton experts run in the CPU interpreter here (tiny sizes), at gpt-oss-20b sizes on GPU
(test_moe_gpu_bias.py).
"""

from __future__ import annotations

import pytest
import torch
from bias_cases import loop_reference, make_bias_inputs, run
from moe_cases import COMBOS, tolerance

from treadle_moe import Fp8Layout, FusedMoE, Int4Layout, MoEProblem, select_moe_kernel
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.int4_layer import allocate_int4

# (tokens, hidden K, intermediate N, experts, top_k, experts left without tokens)
CASES = [(1, 64, 32, 8, 1, 0), (7, 48, 40, 8, 4, 2), (20, 32, 32, 16, 2, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-K{}-N{}-E{}-k{}-skip{}".format(*c))
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_biased_experts_match_loop(
    combo: str, activation: str, case: tuple[int, ...], dtype: torch.dtype
) -> None:
    inputs = make_bias_inputs(case, dtype, seed=case[0])
    alpha, limit = (1.702, 7.0) if case[0] % 2 else (1.3, 2.5)
    epilogue = ExpertEpilogue(inputs["b13"], inputs["b2"], alpha, limit)
    out = run(combo, inputs, activation, epilogue)
    ref = loop_reference(inputs, activation, alpha, limit)
    scale = ref.abs().max()
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.double().cpu() / scale, ref / scale, atol=atol, rtol=rtol)


@pytest.mark.parametrize("combo", ["standard-torch", "standard-triton"])
def test_other_ranks_experts_and_missing_down_bias(combo: str) -> None:
    """Slots of expert -1 (expert parallelism: a rank holding experts 0..3 of 8) add nothing, their biases included;
    w2_bias None (a TP rank but one) adds no down bias."""
    inputs = make_bias_inputs((9, 32, 32, 8, 3, 0), torch.float32, seed=2)
    inputs["topk_ids"] = torch.where(inputs["topk_ids"] >= 4, -1, inputs["topk_ids"])
    held = {name: inputs[name][:4] for name in ("w13", "w2", "b13")}
    out = run(combo, dict(inputs, **held), "swigluoai", ExpertEpilogue(held["b13"], None), routed_experts=8)
    ref = loop_reference(dict(inputs, b2=torch.zeros_like(inputs["b2"])), "swigluoai", 1.702, 7.0)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-4, rtol=2e-4)


def _layer(activation: str = "swigluoai", bias: bool = True) -> FusedMoE:
    moe = FusedMoE(4, 2, 32, 32, dtype=torch.float32, activation=activation, bias=bias)
    torch.nn.init.normal_(moe.w13_weight)
    torch.nn.init.normal_(moe.w2_weight)
    return moe


@pytest.mark.parametrize(("activation", "bias", "what"), [("silu", True, "expert biases"),
                                                          ("swigluoai", False, "swigluoai")])  # fmt: skip
def test_quantized_experts_are_refused(activation: str, bias: bool, what: str) -> None:
    """Online fp8, an fp8 checkpoint's storage and 4-bit storage all refuse a layer with biases or swigluoai, and so
    does the oracle for a problem that has them."""
    with pytest.raises(ValueError, match=f"fp8 experts do not support.*{what}"):
        _layer(activation, bias).quantize_fp8(Fp8Layout())
    with pytest.raises(ValueError, match=f"fp8 experts do not support.*{what}"):
        _layer(activation, bias).allocate_fp8(Fp8Layout((16, 16)))
    with pytest.raises(ValueError, match=f"4-bit experts do not support.*{what}"):
        allocate_int4(_layer(activation, bias), Int4Layout(32, False, False), 1, 1, torch.float16)
    problem = MoEProblem(4, 2, 32, 32, torch.bfloat16, torch.device("cpu"), activation=activation, has_bias=bias,
                         fp8=Fp8Layout())  # fmt: skip
    with pytest.raises(ValueError, match=what):
        select_moe_kernel(problem)
    assert _layer("silu", False).quantize_fp8(Fp8Layout()) is None  # a plain layer still quantizes


def test_unbiased_swigluoai_layer_and_loader_layout() -> None:
    """A layer's biases load per expert and shard (gate's in columns :N, up's in N:), and an unloaded down bias of
    zero equals none."""
    moe = _layer()
    assert moe.w13_bias is not None and moe.w2_bias is not None
    gate, up, down = torch.randn(32), torch.randn(32), torch.randn(32)
    moe.weight_loader(moe.w13_bias, gate, "gate bias", "w1", 2)
    moe.weight_loader(moe.w13_bias, up, "up bias", "w3", 2)
    moe.weight_loader(moe.w2_bias, down, "down bias", "w2", 2)
    assert torch.equal(moe.w13_bias[2], torch.cat([gate, up])) and torch.equal(moe.w2_bias[2], down)
    assert not moe.w13_bias[[0, 1, 3]].any() and not moe.w2_bias[[0, 1, 3]].any()
    with pytest.raises(ValueError, match="shape"):
        moe.weight_loader(moe.w13_bias, torch.randn(31), "gate bias", "w1", 0)
    x, logits = torch.randn(6, 32), torch.randn(6, 4)
    plain = _layer(bias=False)
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if "bias" not in k})
    moe.w13_bias.data.zero_()
    moe.w2_bias.data.zero_()
    torch.testing.assert_close(moe(x, logits), plain(x, logits))
