"""The combination matrix: every prepare/finalize x experts (x format) x dtype against the torch reference.

Random routing on fresh inputs; sizes sampled from tokens 1…2048, experts 8…128, top-k 1…8, with cases where
some experts receive no token. Triton experts run in the CPU interpreter here (small cases only) and at real
sizes on GPU (test_gpu.py). The torch reference itself is checked against a dense float64 spec.
"""

from __future__ import annotations

import pytest
import torch
from moe_cases import COMBOS, DEVICE, make_moe_inputs, moe_reference_fp64, run_combo, tolerance

from treadle_moe import (
    BatchedTorchExperts,
    ModularKernel,
    NoEPBatchedPrepareFinalize,
    NoEPStandardPrepareFinalize,
)

# (tokens, hidden K, intermediate N, experts, top_k, experts left without tokens)
SMALL_CASES = [
    (1, 64, 32, 8, 1, 0),
    (5, 64, 32, 8, 2, 3),
    (19, 48, 48, 16, 4, 6),  # K, N not multiples of the interpreter's 32-wide blocks
    (12, 32, 32, 128, 8, 64),  # most of 128 experts receive nothing
]
LARGE_CASES = [
    (300, 64, 32, 64, 6, 0),
    (2048, 32, 16, 32, 8, 0),
]
DTYPES = [torch.float32, torch.bfloat16]


def reference(inputs: dict[str, torch.Tensor], activation: str = "silu") -> torch.Tensor:
    return run_combo("standard-torch", inputs, activation)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = tolerance(dtype)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite values in the MoE output"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL_CASES[:3], ids=lambda c: "M{}-K{}-N{}-E{}-k{}-skip{}".format(*c))
def test_torch_reference_matches_dense_fp64_spec(case: tuple[int, ...], dtype: torch.dtype) -> None:
    m, k, n, e, top_k, skip = case
    inputs = make_moe_inputs(m, k, n, e, top_k, dtype, seed=m, skip_experts=skip)
    spec = moe_reference_fp64(inputs).to(dtype)
    assert_close(reference(inputs), spec, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "M{}-K{}-N{}-E{}-k{}-skip{}".format(*c))
@pytest.mark.parametrize("combo", [c for c in COMBOS if c != "standard-torch"])
def test_matrix_small(combo: str, case: tuple[int, ...], dtype: torch.dtype) -> None:
    m, k, n, e, top_k, skip = case
    if combo == "batched-triton" and e > 16 and DEVICE == "cpu":
        pytest.skip("the interpreter runs one program per (expert, block): too slow for many experts on CPU")
    inputs = make_moe_inputs(m, k, n, e, top_k, dtype, seed=1000 + m, skip_experts=skip)
    assert_close(run_combo(combo, inputs), reference(inputs), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: "M{}-K{}-N{}-E{}-k{}-skip{}".format(*c))
@pytest.mark.parametrize(
    "combo", [c for c, (_, _, interp) in COMBOS.items() if not interp or torch.cuda.is_available()]
)
def test_matrix_large(combo: str, case: tuple[int, ...], dtype: torch.dtype) -> None:
    m, k, n, e, top_k, skip = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_moe_inputs(m, k, n, e, top_k, dtype, device=device, seed=7 + m, skip_experts=skip)
    assert_close(run_combo(combo, inputs), reference(inputs), dtype)


@pytest.mark.parametrize("combo", ["standard-triton", "batched-triton", "batched-torch"])
def test_gelu_tanh_activation(combo: str) -> None:
    inputs = make_moe_inputs(9, 32, 32, 8, 2, torch.float32, seed=3)
    spec = moe_reference_fp64(inputs, "gelu_tanh").float()
    assert_close(reference(inputs, "gelu_tanh"), spec, torch.float32)
    assert_close(run_combo(combo, inputs, "gelu_tanh"), spec, torch.float32)


def test_zero_tokens() -> None:
    inputs = make_moe_inputs(0, 32, 16, 8, 2, torch.float32)
    for combo in COMBOS:
        assert run_combo(combo, inputs).shape == (0, 32)


def test_formats_must_match() -> None:
    with pytest.raises(ValueError, match="activation format"):
        ModularKernel(NoEPStandardPrepareFinalize(), BatchedTorchExperts())


def test_batched_cap_overflow_is_an_error() -> None:
    inputs = make_moe_inputs(16, 32, 16, 8, 2, torch.float32, skip_experts=6)  # 2 experts take all 32 slots
    kernel = ModularKernel(NoEPBatchedPrepareFinalize(max_tokens_per_expert=4), BatchedTorchExperts())
    with pytest.raises(ValueError, match="max_tokens_per_expert"):
        kernel(inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])


def test_batched_cap_large_enough_matches() -> None:
    inputs = make_moe_inputs(16, 32, 16, 8, 2, torch.float32, seed=5)
    kernel = ModularKernel(NoEPBatchedPrepareFinalize(max_tokens_per_expert=16), BatchedTorchExperts())
    out = kernel(inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"])
    assert_close(out, reference(inputs), torch.float32)
