"""FusedMoE layer: forward against the spec, weight loading from per-expert checkpoints, shared experts."""

from __future__ import annotations

import pytest
import torch
from moe_cases import DEVICE, moe_reference_fp64

from treadle_moe import FusedMoE, SharedExperts, select_experts


def hf_style_experts(num_experts: int, hidden: int, inter: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per-expert checkpoint tensors like HF safetensors: gate_proj / up_proj [I, H], down_proj [H, I]."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "gate_proj": torch.randn(inter, hidden, generator=gen) / hidden**0.5,
            "up_proj": torch.randn(inter, hidden, generator=gen) / hidden**0.5,
            "down_proj": torch.randn(hidden, inter, generator=gen) / inter**0.5,
        }
        for _ in range(num_experts)
    ]


def hf_moe_forward(
    x: torch.Tensor, logits: torch.Tensor, experts: list[dict[str, torch.Tensor]], top_k: int
) -> torch.Tensor:
    """What a HF Qwen3-MoE / Mixtral block computes (norm_topk_prob=True), written out per token."""
    probs = torch.softmax(logits.double(), -1)
    weights, ids = probs.topk(top_k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = experts[int(ids[t, j])]
            h = torch.nn.functional.silu(e["gate_proj"].double() @ x[t].double()) * (
                e["up_proj"].double() @ x[t].double()
            )
            out[t] += weights[t, j] * (e["down_proj"].double() @ h)
    return out


def build_layer(
    num_experts: int, hidden: int, inter: int, top_k: int, seed: int = 0, **kwargs: object
) -> tuple[FusedMoE, list[dict[str, torch.Tensor]]]:
    layer = FusedMoE(num_experts, top_k, hidden, inter, renormalize=True, dtype=torch.float32, **kwargs)  # type: ignore[arg-type]
    experts = hf_style_experts(num_experts, hidden, inter, seed)
    mapping = FusedMoE.make_expert_params_mapping(num_experts)
    params = {"experts.w13_weight": layer.w13_weight, "experts.w2_weight": layer.w2_weight}
    for param_name, fragment, expert_id, shard_id in mapping:
        ckpt_name = fragment.split(".")[2]
        param = params[param_name]
        param.weight_loader(param, experts[expert_id][ckpt_name], fragment + "weight", shard_id, expert_id)  # type: ignore[attr-defined]
    return layer, experts


@pytest.mark.parametrize("backend", [None, "torch_batched", "triton"])
def test_forward_matches_hf_semantics(backend: str | None) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    layer, experts = build_layer(8, 32, 16, 2, seed=1, backend=backend)
    x = torch.randn(11, 32)
    logits = torch.randn(11, 8)
    out = layer.to(DEVICE)(x.to(DEVICE), logits.to(DEVICE)).cpu()
    torch.testing.assert_close(out.double(), hf_moe_forward(x, logits, experts, 2), atol=2e-5, rtol=2e-5)
    assert "experts=" in layer.describe()


def test_leading_dims_and_bf16() -> None:
    layer, _ = build_layer(8, 32, 16, 2, seed=2)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    logits = torch.randn(2, 5, 8)
    out = layer(x, logits)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    weights, ids = select_experts(logits.reshape(-1, 8), 2, True)
    spec = moe_reference_fp64(
        {
            "hidden": x.reshape(-1, 32),
            "w13": layer.w13_weight,
            "w2": layer.w2_weight,
            "topk_weights": weights,
            "topk_ids": ids,
        }
    )
    torch.testing.assert_close(out.reshape(-1, 32).float(), spec.float(), atol=6e-2, rtol=5e-2)


def test_mixtral_names_and_stacked_load() -> None:
    mapping = FusedMoE.make_expert_params_mapping(4, "w1", "w2", "w3")
    assert ("experts.w13_weight", "experts.3.w3.", 3, "w3") in mapping
    assert ("experts.w2_weight", "experts.0.w2.", 0, "w2") in mapping
    layer = FusedMoE(4, 2, 16, 8, dtype=torch.float32)
    gate_up, down = torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    layer.load_stacked_weights(gate_up, down)
    assert torch.equal(layer.w13_weight, gate_up) and torch.equal(layer.w2_weight, down)
    layer.load_expert_weight(1, "w3", torch.ones(8, 16))
    assert (layer.w13_weight[1, 8:] == 1).all() and torch.equal(layer.w13_weight[1, :8], gate_up[1, :8])


def test_weight_loader_errors() -> None:
    layer = FusedMoE(4, 2, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="shard_id"):
        layer.load_expert_weight(0, "w4", torch.zeros(8, 16))
    with pytest.raises(ValueError, match="expected"):
        layer.load_expert_weight(0, "w1", torch.zeros(16, 8))
    with pytest.raises(ValueError, match="out of range"):
        layer.load_expert_weight(9, "w2", torch.zeros(16, 8))
    with pytest.raises(ValueError, match="tokens"):
        layer(torch.zeros(3, 16), torch.zeros(4, 4))


def test_shared_experts_are_added() -> None:
    torch.manual_seed(0)
    shared = SharedExperts(32, 24, use_gate=True, dtype=torch.float32)
    for shard, shape in (
        ("gate_proj", (24, 32)),
        ("up_proj", (24, 32)),
        ("down_proj", (32, 24)),
        ("gate", (1, 32)),
    ):
        shared.load_weight(shard, torch.randn(shape) / 5)
    layer, _ = build_layer(8, 32, 16, 2, seed=3, shared_experts=shared)
    plain, _ = build_layer(8, 32, 16, 2, seed=3)
    x, logits = torch.randn(6, 32), torch.randn(6, 8)
    g, u = x @ shared.gate_up_proj[:24].t(), x @ shared.gate_up_proj[24:].t()
    assert shared.gate is not None
    expected_shared = torch.sigmoid(x @ shared.gate.t()) * (
        (torch.nn.functional.silu(g) * u) @ shared.down_proj.t()
    )
    torch.testing.assert_close(layer(x, logits), plain(x, logits) + expected_shared, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        SharedExperts(8, 4).load_weight("gate", torch.zeros(1, 8))


def test_grouped_sigmoid_layer_with_bias() -> None:
    layer = FusedMoE(
        16,
        2,
        16,
        8,
        dtype=torch.float32,
        scoring="sigmoid",
        num_expert_group=4,
        topk_group=2,
        use_correction_bias=True,
        routed_scaling_factor=2.0,
    )
    torch.nn.init.normal_(layer.w13_weight)
    torch.nn.init.normal_(layer.w2_weight)
    assert layer.e_score_correction_bias is not None
    layer.e_score_correction_bias.data[3] = 10.0  # expert 3 always selected
    x, logits = torch.randn(5, 16), torch.randn(5, 16)
    weights, ids = select_experts(logits, 2, True, "sigmoid", 4, 2, layer.e_score_correction_bias, 2.0)
    assert (ids == 3).any(dim=1).all()
    spec = moe_reference_fp64(
        {
            "hidden": x,
            "w13": layer.w13_weight,
            "w2": layer.w2_weight,
            "topk_weights": weights,
            "topk_ids": ids,
        }
    )
    torch.testing.assert_close(layer(x, logits).double(), spec, atol=1e-4, rtol=1e-4)
