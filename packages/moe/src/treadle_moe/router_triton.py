"""Routing in one Triton launch (imported lazily: this module imports triton).

The same selection as router.py's torch ops -- scores, optional correction bias, grouped top-k, top-k,
renormalization, routed_scaling_factor -- for one token per program, all its experts in registers (E padded to a
power of two, E_P2 <= MAX_EXPERTS). Where the torch path takes 5 (greedy softmax) to 12 (DeepSeek-V3's biased
grouped routing) small kernels a MoE layer, each a few microseconds of launch at decode sizes, this is one.

Per token, with `choice` = scores (+ bias) and ties broken towards the lower expert id:
1. groups (num_expert_group > 1): each group's score is its best choice (with a bias: the sum of its two best); the
   `topk_group` best groups stay eligible, every other expert's choice becomes -inf;
2. top-k: k times, the best remaining choice is taken (its unbiased score is its weight) and removed, so the ids
   come in descending choice order, as torch.topk gives them;
3. the weights divided by their sum (renormalize), times routed_scaling_factor.
Scoring runs in float32 from logits of any float dtype. The weights equal the torch path's up to float32 rounding
(softmax's sum is taken in another order); the ids equal its ids wherever no two choices tie.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024


@triton.jit
def _take_best(choice, offs, E_P2: tl.constexpr):
    """(the best value of `choice`, the lowest index holding it)."""
    best = tl.max(choice, axis=0)
    idx = tl.min(tl.where(choice == best, offs, E_P2), axis=0)
    return best, idx


@triton.jit
def _route_kernel(
    logits_ptr, logits_stride, bias_ptr, weights_ptr, ids_ptr, num_experts, group_size, scaling,
    TOP_K: tl.constexpr, K_P2: tl.constexpr, E_P2: tl.constexpr, G_P2: tl.constexpr, NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, E_P2)
    valid = offs < num_experts
    x = tl.load(logits_ptr + row * logits_stride + offs, mask=valid, other=0.0).to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        x = tl.where(valid, x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        scores = e / tl.sum(e, axis=0)
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if NUM_GROUPS > 1:
        group_of = offs // group_size
        g_offs = tl.arange(0, G_P2)
        group_scores = tl.full((G_P2,), float("-inf"), tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_group = tl.where(group_of == g, choice, float("-inf"))
            best, idx = _take_best(in_group, offs, E_P2)
            score = best
            if HAS_BIAS:  # the sum of the group's two best (one when a group holds one expert)
                second = tl.max(tl.where(offs == idx, float("-inf"), in_group), axis=0)
                score = best + tl.where(second == float("-inf"), 0.0, second)
            group_scores = tl.where(g_offs == g, score, group_scores)
        eligible = offs < 0  # none yet
        for _ in tl.static_range(TOPK_GROUP):
            _, g_best = _take_best(group_scores, g_offs, G_P2)
            eligible = eligible | (group_of == g_best)
            group_scores = tl.where(g_offs == g_best, float("-inf"), group_scores)
        choice = tl.where(eligible, choice, float("-inf"))
    k_offs = tl.arange(0, K_P2)
    weights = tl.zeros((K_P2,), tl.float32)
    ids = tl.zeros((K_P2,), tl.int32)
    for k in tl.static_range(TOP_K):
        _, idx = _take_best(choice, offs, E_P2)
        weight = tl.sum(tl.where(offs == idx, scores, 0.0), axis=0)
        weights = tl.where(k_offs == k, weight, weights)
        ids = tl.where(k_offs == k, idx, ids)
        choice = tl.where(offs == idx, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    k_mask = k_offs < TOP_K
    tl.store(weights_ptr + row * TOP_K + k_offs, weights * scaling, mask=k_mask)
    tl.store(ids_ptr + row * TOP_K + k_offs, ids, mask=k_mask)


def route_triton(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    sigmoid: bool,
    num_expert_group: int,
    topk_group: int,
    correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (E <= MAX_EXPERTS, last dim contiguous) -> (weights float32, ids int32), [T, top_k]."""
    num_tokens, num_experts = router_logits.shape
    assert num_experts <= MAX_EXPERTS and router_logits.stride(1) == 1, (
        "router_triton: E <= 1024, rows contiguous"
    )
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    bias = correction_bias if correction_bias is not None else weights  # never read without HAS_BIAS
    _route_kernel[(num_tokens,)](
        router_logits, router_logits.stride(0), bias, weights, ids, num_experts,
        num_experts // num_expert_group, routed_scaling_factor,
        TOP_K=top_k, K_P2=triton.next_power_of_2(top_k), E_P2=triton.next_power_of_2(num_experts),
        G_P2=triton.next_power_of_2(num_expert_group), NUM_GROUPS=num_expert_group, TOPK_GROUP=topk_group,
        SIGMOID=sigmoid, HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize,
        num_warps=4 if num_experts > 256 else 1,
    )  # fmt: skip
    return weights, ids
