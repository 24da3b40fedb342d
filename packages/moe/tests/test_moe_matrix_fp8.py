"""The combination matrix for fp8 experts: every prepare/finalize x experts x fp8 layout against the torch reference.

Weights quantized in the test (fp8_cases.py): per channel, and block-wise with 16 x 32 and 32 x 16 tiles on K = N = 48,
so the last tile of every matrix is ragged, gate and up grids are stacked with a ragged last block row (N = 48 is
not a multiple of 32), and a K step of the block-scaled GEMM is a whole activation group. The torch reference (the
dense IR fp8 ops per expert) is itself checked against the spec written in the test. Rows (tokens) are compared
with `assert_rows_close`: most match to rounding, a rare one may carry an intermediate value rounded to the other
e4m3 neighbour. Triton runs in the CPU interpreter here (fp32; and bf16, where the interpreter's fp32 -> bf16
conversion truncates instead of rounding to nearest, so nearly every projection output sits one bf16 step off the
reference's and flips some e4m3 roundings of the next quantization: a few % of the output's norm), at real sizes on
GPU (test_moe_gpu_fp8.py).
"""

from __future__ import annotations

import pytest
import torch
from fp8_cases import LAYOUTS, assert_rows_close, make_fp8_inputs, moe_fp8_spec, relative_error
from moe_cases import COMBOS, make_moe_inputs, run_combo

from treadle_moe import (
    Fp8ExpertScales,
    ModularKernel,
    NoEPStandardPrepareFinalize,
    TorchExperts,
    TritonExperts,
)
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.fp8 import Fp8Layout

# (tokens, hidden K, intermediate N, experts, top_k); 2 of the 8 experts receive no token
CASE = (13, 48, 48, 8, 3)
SKIP = 2
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # a row's relative error without an e4m3 flip


def run_fp8(combo: str, inputs: dict[str, torch.Tensor], scales: Fp8ExpertScales) -> torch.Tensor:
    pf_cls, experts_cls, interpreted = COMBOS[combo]
    if interpreted:
        pytest.importorskip("triton")
    kernel = ModularKernel(pf_cls(), experts_cls())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    return kernel(*args, fp8=scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_reference_is_the_spec(layout: str, dtype: torch.dtype) -> None:
    inputs, scales = make_fp8_inputs(LAYOUTS[layout], *CASE, dtype, device="cpu", seed=1, skip_experts=SKIP)
    got = run_fp8("standard-torch", inputs, scales)
    assert_rows_close(got, moe_fp8_spec(inputs, scales), ROUNDING[dtype])
    # and it is not the unquantized MoE: the fp8 activations and weights move the output by a few %
    plain = make_moe_inputs(*CASE, dtype, device="cpu", seed=1, skip_experts=SKIP)
    assert relative_error(got, run_combo("standard-torch", plain)) > 0.01


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("combo", [c for c in COMBOS if c != "standard-torch"])
def test_matrix_fp8_fp32(combo: str, layout: str) -> None:
    inputs, scales = make_fp8_inputs(LAYOUTS[layout], *CASE, torch.float32, seed=7, skip_experts=SKIP)
    ref = run_fp8("standard-torch", inputs, scales)
    assert_rows_close(run_fp8(combo, inputs, scales), ref, ROUNDING[torch.float32])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_tiles_smaller_than_the_scale_blocks(layout: str) -> None:
    """16 x 16 x 16 tiles: a weight tile's rows gather two scale rows' worth of N blocks, and a K block spans two
    (block16x32) or one (block32x16) GEMM steps, so each step finds its group's scales by position."""
    pytest.importorskip("triton")
    inputs, scales = make_fp8_inputs(LAYOUTS[layout], *CASE, torch.float32, seed=11, skip_experts=SKIP)
    ref = run_fp8("standard-torch", inputs, scales)
    kernel = ModularKernel(
        NoEPStandardPrepareFinalize(), TritonExperts(BlockConfig(16, 16, 16, num_stages=1))
    )
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    assert_rows_close(kernel(*args, fp8=scales), ref, ROUNDING[torch.float32])


@pytest.mark.parametrize("layout", ["channel", "block16x32"])
def test_triton_fp8_bf16(layout: str) -> None:
    inputs, scales = make_fp8_inputs(LAYOUTS[layout], 9, 64, 32, 8, 2, torch.bfloat16, seed=3)
    ref = run_fp8("standard-torch", inputs, scales)
    # the interpreter's truncating bf16 conversion (module docstring): measured 2-3 % of the norm
    assert relative_error(run_fp8("standard-triton", inputs, scales), ref) < 5e-2


def test_scales_must_match_the_weights() -> None:
    inputs, scales = make_fp8_inputs(None, *CASE, torch.float32, device="cpu")
    kernel = ModularKernel(NoEPStandardPrepareFinalize(), TorchExperts())
    args = (inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    with pytest.raises(ValueError, match=r"float8_e4m3fn expert weights need their scales"):
        kernel(*args)
    wrong = Fp8ExpertScales(scales.w13, scales.w2, Fp8Layout((16, 16)))
    with pytest.raises(
        ValueError, match=r"w13 scale is torch.float32 \(8, 96\); fp8 w8a8 block-wise .* \(8, 6, 3\)"
    ):
        kernel(*args, fp8=wrong)
    plain = make_moe_inputs(*CASE, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"fp8 scales were given but the expert weights are torch.float32"):
        kernel(
            plain["hidden"], plain["w13"], plain["w2"], plain["topk_weights"], plain["topk_ids"], fp8=scales
        )
