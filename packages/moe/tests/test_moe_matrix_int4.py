"""The combination matrix for 4-bit (W4A16) experts: every prepare/finalize x experts x 4-bit layout against a spec
written in the test (int4_cases.py: packing, round-to-nearest quantization and the dequantized per-token MLP).

Layouts on K = N = 48: groups of 16 (asymmetric; and act order, sym and asym: each projection's rows grouped in a
random order, the kernel gathering each row's group through g_idx), 32 (symmetric, a ragged last group), 24 (not a
power of two: a K step straddles groups, so the kernel gathers each row's scale) and one group per output column.
The Triton kernels run in the CPU interpreter here: fp32 within 1e-5, bf16 within a few % (the interpreter's
fp32 -> bf16 conversion truncates instead of rounding to nearest); at real sizes on GPU (test_moe_gpu_int4.py).
"""

from __future__ import annotations

import pytest
import torch
from int4_cases import LAYOUTS, make_int4_inputs, moe_int4_spec
from moe_cases import COMBOS, make_moe_inputs, run_combo

from treadle_moe import Int4ExpertScales, Int4Layout, ModularKernel, NoEPStandardPrepareFinalize, TorchExperts
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.triton_fused import TritonExperts

# (tokens, hidden K, intermediate N, experts, top_k); 2 of the 8 experts receive no token
CASE = (13, 48, 48, 8, 3)
SKIP = 2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run_int4(combo: str, inputs: dict[str, torch.Tensor], scales: Int4ExpertScales, activation: str = "silu"):
    pf_cls, experts_cls, interpreted = COMBOS[combo]
    if interpreted:
        pytest.importorskip("triton")
    kernel = ModularKernel(pf_cls(), experts_cls())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    return kernel(*args, activation, int4=scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_reference_is_the_spec(layout: str, dtype: torch.dtype) -> None:
    inputs, scales = make_int4_inputs(layout, *CASE, dtype, device="cpu", seed=1, skip_experts=SKIP)
    got = run_int4("standard-torch", inputs, scales)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(got, moe_int4_spec(inputs)) < tolerance
    # and it is not the unquantized MoE: 4-bit weights move the output by several %
    plain = make_moe_inputs(*CASE, dtype, device="cpu", seed=1, skip_experts=SKIP)
    assert relative_error(got, run_combo("standard-torch", plain)) > 0.02


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("combo", [c for c in COMBOS if c != "standard-torch"])
def test_matrix_int4_fp32(combo: str, layout: str) -> None:
    inputs, scales = make_int4_inputs(layout, *CASE, torch.float32, seed=7, skip_experts=SKIP)
    assert relative_error(run_int4(combo, inputs, scales), moe_int4_spec(inputs)) < 1e-5


@pytest.mark.parametrize("layout", ["g16-asym", "g24-asym", "g16-sym-act-order"])
@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton"])
def test_matrix_int4_bf16_gelu(combo: str, layout: str) -> None:
    inputs, scales = make_int4_inputs(layout, 9, 64, 32, 8, 2, torch.bfloat16, seed=3)
    got = run_int4(combo, inputs, scales, "gelu_tanh")
    # the interpreter's truncating bf16 conversion (module docstring): measured 1-2 % of the norm
    assert relative_error(got, moe_int4_spec(inputs, "gelu_tanh")) < 4e-2


@pytest.mark.parametrize("layout", ["g16-asym", "g32-sym", "g16-asym-act-order"])
def test_triton_tiles_across_groups(layout: str) -> None:
    """16 x 16 x 32 tiles: with groups of 16 a K step spans two groups (the kernel gathers each row's scale), with
    groups of 32 exactly one; N = 48 leaves a partial column tile in both GEMMs."""
    pytest.importorskip("triton")
    inputs, scales = make_int4_inputs(layout, *CASE, torch.float32, seed=11, skip_experts=SKIP)
    kernel = ModularKernel(
        NoEPStandardPrepareFinalize(), TritonExperts(BlockConfig(16, 16, 32, num_stages=1))
    )
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    assert relative_error(kernel(*args, int4=scales), moe_int4_spec(inputs)) < 1e-5


def test_scales_must_match_the_weights() -> None:
    inputs, scales = make_int4_inputs("g16-asym", *CASE, torch.float32, device="cpu")
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TorchExperts())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    wrong = Int4ExpertScales(scales.w13_scale, scales.w2_scale, scales.w13_zero, scales.w2_zero, None, None,
                             Int4Layout(32, True, False))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"w13 scales .* \(8, 3, 96\): w4a16 \(group size 32.* needs float \(8, 2, 96\)"
    ):
        kernel(*args, int4=wrong)
    no_zeros = Int4ExpertScales(scales.w13_scale, scales.w2_scale, None, None, None, None, scales.layout)
    with pytest.raises(ValueError, match=r"w13 zero points must be uint8"):
        kernel(*args, int4=no_zeros)
    with pytest.raises(ValueError, match=r"w2 must be \(8, 6, 48\)"):
        kernel(inputs["hidden"], inputs["w13"], inputs["w2"][:, :3], inputs["topk_weights"], inputs["topk_ids"],
               int4=scales)  # fmt: skip
