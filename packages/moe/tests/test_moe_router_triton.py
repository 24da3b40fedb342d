"""The one-launch Triton routing (router_triton.py) against the torch ops of router.py, on CUDA when there is one,
else under the Triton interpreter: the same ids (random continuous logits, so no ties) and weights within float32
rounding, for every routing treadle's MoE models use -- and empty batches, bf16 logits, non-power-of-two E."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from treadle_moe import select_experts

# name -> (experts, select_experts arguments)
CASES: dict[str, tuple[int, dict[str, Any]]] = {
    "softmax greedy (DeepSeek-V2-Lite)": (64, dict(top_k=6, renormalize=False, routed_scaling_factor=1.0)),
    "softmax renormalized (Qwen3-MoE)": (128, dict(top_k=8, renormalize=True)),
    "softmax, 60 experts (Qwen2-MoE)": (60, dict(top_k=4, renormalize=False)),
    "softmax group_limited_greedy (DeepSeek-V2)": (
        160, dict(top_k=6, renormalize=False, num_expert_group=8, topk_group=3, routed_scaling_factor=16.0)),
    "sigmoid biased grouped (DeepSeek-V3)": (
        256, dict(top_k=8, renormalize=True, scoring="sigmoid", num_expert_group=8, topk_group=4,
                  routed_scaling_factor=2.5, bias=True)),
    "sigmoid biased, one group (GLM-4.5-Air)": (
        128, dict(top_k=8, renormalize=True, scoring="sigmoid", num_expert_group=1, topk_group=1, bias=True)),
    "sigmoid biased, no groups": (16, dict(top_k=4, renormalize=True, scoring="sigmoid", bias=True)),
    "sigmoid biased, groups of one expert": (
        8, dict(top_k=2, renormalize=False, scoring="sigmoid", num_expert_group=8, topk_group=4, bias=True)),
    "sigmoid plain": (8, dict(top_k=2, renormalize=False, scoring="sigmoid")),
    "softmax, top-1 of 2": (2, dict(top_k=1, renormalize=False)),
}  # fmt: skip


def _route(logits: torch.Tensor, args: dict[str, Any], bias: torch.Tensor | None, use_triton: bool) -> Any:
    kwargs = {k: v for k, v in args.items() if k != "bias"}
    return select_experts(logits, correction_bias=bias, use_triton=use_triton, **kwargs)


@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_routing_equals_torch_routing(case: str, tokens: int) -> None:
    pytest.importorskip("triton")
    experts, args = CASES[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    logits = (torch.randn(tokens, experts, generator=gen) * 2).to(device)
    bias = (torch.randn(experts, generator=gen) * 0.5).to(device) if args.get("bias") else None
    ref_w, ref_ids = _route(logits, args, bias, use_triton=False)
    got_w, got_ids = _route(logits, args, bias, use_triton=True)
    assert got_ids.dtype == torch.int32 and got_w.dtype == torch.float32
    assert torch.equal(got_ids, ref_ids), (got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=2e-6, atol=1e-7)


def test_bf16_strided_and_empty_batches() -> None:
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    # distinct multiples of 1/16, exact in bf16: no ties (torch.topk orders tied values its own way)
    wide = torch.stack([torch.randperm(96, generator=gen) for _ in range(9)]).sub(48).div(16)
    logits = wide.to(device=device, dtype=torch.bfloat16)[:, :64]  # rows 96 apart
    args = dict(top_k=6, renormalize=True, num_expert_group=4, topk_group=2)
    ref_w, ref_ids = _route(logits, args, None, use_triton=False)
    got_w, got_ids = _route(logits, args, None, use_triton=True)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=2e-6, atol=1e-7)
    w, ids = _route(logits[:0], args, None, use_triton=True)
    assert w.shape == ids.shape == (0, 6)
