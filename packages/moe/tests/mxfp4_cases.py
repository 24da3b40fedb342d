"""Test helpers (no tests here): MoE problems with MXFP4 experts (experts/mxfp4.py), the kernel combos run on them,
and a check that an MXFP4 kernel's output matches the torch reference's on the same blocks."""

from __future__ import annotations

import torch
from moe_cases import COMBOS, make_moe_inputs, skip_without_triton, tolerance

from treadle_moe import ModularKernel
from treadle_moe.configs import BlockConfig
from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, quantize_experts_mxfp4


def make_mxfp4_inputs(
    case: tuple[int, ...], dtype: torch.dtype, seed: int, device: str, bias: bool
) -> tuple[dict[str, torch.Tensor], Mxfp4ExpertScales, ExpertEpilogue | None]:
    """make_moe_inputs' problem (tokens, K, N, experts, top_k, experts without tokens) with its experts quantized to
    MXFP4 (blocks in "w13" / "w2"), hidden states of std 4 (some swigluoai pre-activations pass its limit), and O(1)
    biases when `bias`."""
    m, k, n, e, top_k, skip = case
    inputs = make_moe_inputs(m, k, n, e, top_k, torch.float32, device="cpu", seed=seed, skip_experts=skip)
    b13, b2, scales = quantize_experts_mxfp4(inputs["w13"], inputs["w2"])
    gen = torch.Generator().manual_seed(seed + 1)
    epilogue = None
    if bias:
        b13_bias, b2_bias = torch.randn(e, 2 * n, generator=gen), torch.randn(e, k, generator=gen)
        epilogue = ExpertEpilogue(b13_bias.to(device, dtype), b2_bias.to(device, dtype))
    moved = Mxfp4ExpertScales(scales.w13_scale.to(device), scales.w2_scale.to(device))
    out = {
        "hidden": (4 * inputs["hidden"]).to(device, dtype),
        "w13": b13.to(device),
        "w2": b2.to(device),
        "topk_weights": inputs["topk_weights"].to(device),
        "topk_ids": inputs["topk_ids"].to(device),
    }
    return out, moved, epilogue


def run_mxfp4(
    combo: str,
    inputs: dict[str, torch.Tensor],
    scales: Mxfp4ExpertScales,
    activation: str,
    epilogue: ExpertEpilogue | None,
    routed_experts: int | None = None,
    block_config: BlockConfig | None = None,
) -> torch.Tensor:
    """The combo's kernel on MXFP4 `inputs`; `routed_experts`: the router's expert count when the weights hold
    fewer (expert parallelism); `block_config`: a given Triton block config."""
    skip_without_triton(combo)
    pf_cls, experts_cls, _ = COMBOS[combo]
    if "triton" in combo:
        experts = experts_cls(block_config, config_experts=routed_experts)  # type: ignore[call-arg]
    else:
        experts = experts_cls()
    kernel = ModularKernel(pf_cls(), experts)
    return kernel(inputs["hidden"], inputs["w13"], inputs["w2"], inputs["topk_weights"], inputs["topk_ids"],
                  activation, epilogue=epilogue, mxfp4=scales)  # fmt: skip


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """out matches ref relative to ref's largest magnitude, at `dtype`'s tolerance."""
    assert torch.isfinite(out).all(), "non-finite values in the MoE output"
    scale = ref.float().abs().max().item()
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(out.float().cpu() / scale, ref.float().cpu() / scale, atol=atol, rtol=rtol)
