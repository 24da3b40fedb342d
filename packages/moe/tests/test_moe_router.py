"""Router: softmax / sigmoid top-k, renormalization, grouped top-k, correction bias, validation."""

from __future__ import annotations

import pytest
import torch

from treadle_moe import RouterConfig, fused_topk, grouped_topk, select_experts


def test_softmax_topk_matches_manual() -> None:
    logits = torch.randn(37, 16)
    weights, ids = fused_topk(logits, 4, renormalize=False)
    probs = torch.softmax(logits, -1)
    expected_w, expected_ids = probs.topk(4, -1)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected_w)
    assert torch.equal(ids.long(), expected_ids)


def test_renormalize_sums_to_one_and_keeps_order() -> None:
    logits = torch.randn(20, 64, dtype=torch.bfloat16)
    weights, ids = fused_topk(logits, 8, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(20))
    assert (weights[:, :-1] >= weights[:, 1:]).all()
    assert all(len(set(row.tolist())) == 8 for row in ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renormalized_softmax_equals_softmax_topk_renormalize(dtype: torch.dtype) -> None:
    # HF's order (Qwen3-MoE, Mixtral): softmax over all experts, top-k, divide by the kept sum
    logits = (torch.randn(301, 128) * 3).to(dtype)
    weights, ids = fused_topk(logits, 8, renormalize=True)
    probs = torch.softmax(logits.float(), -1)
    expected_w, expected_ids = probs.topk(8, -1)
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_w / expected_w.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def test_sigmoid_scoring() -> None:
    logits = torch.randn(10, 8)
    weights, ids = select_experts(logits, 2, renormalize=False, scoring="sigmoid")
    torch.testing.assert_close(weights, torch.sigmoid(logits).gather(1, ids.long()))
    assert torch.equal(ids.long(), torch.sigmoid(logits).topk(2, -1).indices)


def test_grouped_topk_picks_only_from_best_groups() -> None:
    torch.manual_seed(0)
    tokens, experts, groups, keep = 50, 32, 8, 3
    logits = torch.randn(tokens, experts)
    weights, ids = grouped_topk(logits, 4, renormalize=True, num_expert_group=groups, topk_group=keep)
    scores = torch.softmax(logits, -1)
    best_groups = scores.view(tokens, groups, -1).max(-1).values.topk(keep, -1).indices
    for t in range(tokens):
        allowed = {int(g) * (experts // groups) + i for g in best_groups[t] for i in range(experts // groups)}
        assert set(ids[t].tolist()) <= allowed
        # within the allowed experts it is a plain top-k
        masked = torch.full((experts,), -1.0)
        masked[list(allowed)] = scores[t, list(allowed)]
        assert set(ids[t].tolist()) == set(masked.topk(4).indices.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))


def test_correction_bias_changes_selection_not_weights() -> None:
    logits = torch.zeros(4, 8)
    bias = torch.zeros(8)
    bias[5] = 1.0
    weights, ids = select_experts(logits, 1, renormalize=False, scoring="sigmoid", correction_bias=bias)
    assert (ids == 5).all()
    torch.testing.assert_close(weights, torch.full((4, 1), 0.5))


def test_routed_scaling_factor() -> None:
    logits = torch.randn(6, 8)
    w1, _ = select_experts(logits, 2, renormalize=True)
    w2, _ = select_experts(logits, 2, renormalize=True, routed_scaling_factor=2.5)
    torch.testing.assert_close(w2, 2.5 * w1)


def test_router_config_select_and_validation() -> None:
    config = RouterConfig(num_experts=16, top_k=2, num_expert_group=4, topk_group=2)
    weights, ids = config.select(torch.randn(3, 16))
    assert weights.shape == ids.shape == (3, 2)
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="divisible"):
        RouterConfig(num_experts=10, top_k=2, num_expert_group=4, topk_group=1)
    with pytest.raises(ValueError, match="together"):
        RouterConfig(num_experts=8, top_k=2, num_expert_group=2)
    with pytest.raises(ValueError, match="eligible"):
        RouterConfig(num_experts=16, top_k=8, num_expert_group=4, topk_group=1)
    with pytest.raises(ValueError, match="scoring"):
        RouterConfig(num_experts=8, top_k=2, scoring="relu")  # type: ignore[arg-type]
