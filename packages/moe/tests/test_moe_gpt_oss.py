"""gpt-oss's MoE block against transformers' own: `GptOssExperts` (biases, clamped SwiGLU, the weighted down bias)
and `GptOssTopKRouter` (top-k of the logits, softmax over the k), on tiny random configs built here.

The HF experts' checkpoint layout is converted as a loader must: gate_up_proj [E, H, 2I] has the gate at even
columns and the up at odd ones (its bias likewise), so each expert's gate / up matrices are the transposed even / odd
columns, loaded through FusedMoE's `weight_loader` (shards "w1" / "w3" / "w2", global expert ids). Expert parallelism
(two layers holding half the experts each) and tensor parallelism (two layers holding half of every expert's
columns, the down bias added by one of them) must sum to the same output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

from treadle_moe import ExpertPlacement, FusedMoE, RouterConfig

HIDDEN, INTER = 32, 24


def _hf_block(
    num_experts: int, top_k: int, seed: int
) -> tuple[GptOssConfig, GptOssTopKRouter, GptOssExperts]:
    """HF's router and experts with random float32 parameters (biases of the weights' scale, so they matter)."""
    config = GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=num_experts,
                          num_experts_per_tok=top_k)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    router, experts = GptOssTopKRouter(config), GptOssExperts(config)
    with torch.no_grad():
        for module in (router, experts):
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.25)
    return config, router, experts


def _load_hf_experts(moe: FusedMoE, experts: GptOssExperts, columns: slice | None = None) -> None:
    """Copy HF's experts into `moe` expert by expert, de-interleaving gate / up; `columns`: a TP rank's slice of
    the intermediate width (the gate / up rows and biases and the down columns it holds)."""
    cols = columns or slice(None)
    for e in range(experts.num_experts):
        gate_up, gate_up_bias = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]  # [H, 2I], [2I]
        shards = {
            "w1": (gate_up[:, 0::2].t()[cols], gate_up_bias[0::2][cols]),
            "w3": (gate_up[:, 1::2].t()[cols], gate_up_bias[1::2][cols]),
            "w2": (experts.down_proj[e].t()[:, cols], experts.down_proj_bias[e]),
        }
        for shard, (weight, bias) in shards.items():
            param, bias_param = (
                (moe.w2_weight, moe.w2_bias) if shard == "w2" else (moe.w13_weight, moe.w13_bias)
            )
            assert bias_param is not None
            moe.weight_loader(param, weight.to(param.dtype), f"expert {e} {shard}", shard, e)
            moe.weight_loader(bias_param, bias.to(param.dtype), f"expert {e} {shard} bias", shard, e)


def _gpt_oss_moe(
    config: GptOssConfig, dtype: torch.dtype, placement: ExpertPlacement | None = None
) -> FusedMoE:
    """FusedMoE configured as gpt-oss's experts (swigluoai with the config's constants, biases)."""
    return FusedMoE(config.num_local_experts, config.num_experts_per_tok, HIDDEN, INTER, dtype=dtype,
                    activation="swigluoai", swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit,
                    bias=True, placement=placement)  # fmt: skip


def _hf_forward(
    router: GptOssTopKRouter, experts: GptOssExperts, x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        logits, scores, indices = router(x)
        return logits, experts(x, indices, scores)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 4e-2, "rtol": 4e-2}


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"), [(1, 4, 1), (7, 8, 2), (33, 16, 4), (64, 32, 4)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_moe_matches_hf_gpt_oss_experts(num_tokens: int, num_experts: int, top_k: int,
                                              dtype: torch.dtype) -> None:  # fmt: skip
    config, router, experts = _hf_block(num_experts, top_k, seed=num_tokens)
    # a scale that drives some gate / up pre-activations past the limit of 7, so the clamps matter
    x = 6 * torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_experts))
    logits, expected = _hf_forward(router, experts, x)
    moe = _gpt_oss_moe(config, dtype)
    _load_hf_experts(moe, experts)
    out = moe(x.to(dtype), logits.to(dtype)).float()
    if dtype == torch.float32:
        h = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
        assert (h[:, 0::2] > config.swiglu_limit).any() and (h[:, 1::2].abs() > config.swiglu_limit).any()
    scale = expected.abs().max()
    torch.testing.assert_close(out / scale, expected / scale, **_tol(dtype))


def test_expert_parallel_ranks_sum_to_hf() -> None:
    """Two EP ranks: each holds half the experts (slots of the other's come as -1) and its biases; the sum is HF's."""
    config, router, experts = _hf_block(8, 2, seed=3)
    x = 4 * torch.randn(19, HIDDEN, generator=torch.Generator().manual_seed(4))
    logits, expected = _hf_forward(router, experts, x)
    total = torch.zeros_like(expected)
    for rank in range(2):
        moe = _gpt_oss_moe(config, torch.float32, placement=ExpertPlacement.linear(8, rank, 2))
        _load_hf_experts(moe, experts)  # every expert offered; the other rank's ignored
        assert moe.w13_bias is not None and moe.w13_bias.shape == (4, 2 * INTER)
        total += moe(x, logits)
    torch.testing.assert_close(total, expected, atol=2e-5, rtol=2e-5)


class _TensorParallelRank(FusedMoE):
    """A stand-in for model-runner's ParallelFusedMoE: rank `rank` of `size` adds the down bias only on rank 0."""

    rank = 0

    def adds_w2_bias(self) -> bool:
        return self.rank == 0


def test_tensor_parallel_ranks_add_the_down_bias_once() -> None:
    _, router, experts = _hf_block(8, 2, seed=5)
    x = 4 * torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(6))
    logits, expected = _hf_forward(router, experts, x)
    total = torch.zeros_like(expected)
    half = INTER // 2
    for rank in range(2):
        moe = _TensorParallelRank(8, 2, HIDDEN, half, dtype=torch.float32, activation="swigluoai", bias=True)
        moe.rank = rank
        _load_hf_experts(moe, experts, slice(rank * half, (rank + 1) * half))
        total += moe(x, logits)
    torch.testing.assert_close(total, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 1), (32, 4), (128, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_router_matches_hf_gpt_oss_router(num_experts: int, top_k: int, dtype: torch.dtype) -> None:
    """treadle's softmax router with renormalize is gpt-oss's: top-k of the logits, then softmax over those k."""
    _, router, _ = _hf_block(num_experts, top_k, seed=num_experts)
    router = router.to(dtype)
    x = torch.randn(50, HIDDEN, generator=torch.Generator().manual_seed(top_k)).to(dtype)
    with torch.no_grad():
        logits, scores, indices = router(x)
    weights, ids = RouterConfig(num_experts, top_k, renormalize=True, scoring="softmax").select(logits)
    assert torch.equal(ids.long(), indices)
    torch.testing.assert_close(weights, scores.float(), **_tol(dtype))
