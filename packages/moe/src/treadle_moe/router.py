"""Routing: turn router logits into (topk_weights, topk_ids) for every token.

A router scores every expert for every token and keeps the `top_k` best. Three scoring rules cover the MoE
models treadle serves:

- softmax (Mixtral, Qwen2/3-MoE): `p = softmax(logits)`, keep the top-k probabilities; with `renormalize` the kept
  weights are divided by their sum so they add up to 1 per token (HF `norm_topk_prob`).
- sigmoid (DeepSeek-V3 style): `s = sigmoid(logits)`; an optional per-expert `correction_bias` shifts which
  experts get *selected* but the weights are the unbiased scores; `renormalize` as above.
- grouped top-k (DeepSeek): the experts form `num_expert_group` equal groups; each group is scored (its best
  expert, or with a correction bias the sum of its two best), only the `topk_group` best groups stay eligible,
  then the usual top-k runs over the eligible experts.

Invariants of the result: `topk_ids` is int32 [num_tokens, top_k] with distinct ids per row, in descending
score order; `topk_weights` is float32 [num_tokens, top_k] and already includes `routed_scaling_factor`.
Scoring runs in float32 whatever the logits dtype, so bf16 logits route like fp32 ones up to ties.
On CUDA all of it runs as one Triton launch (router_triton.py), the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from treadle_moe import envs

Scoring = Literal["softmax", "sigmoid"]
SCORING_FUNCTIONS: tuple[str, ...] = ("softmax", "sigmoid")
TRITON_MAX_EXPERTS = 1024  # router_triton.MAX_EXPERTS (that module imports triton, so it is imported lazily)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """How a layer routes tokens to experts."""

    num_experts: int  # experts the router scores (E)
    top_k: int  # experts kept per token
    renormalize: bool = True  # divide the kept weights by their sum (HF norm_topk_prob)
    scoring: Scoring = "softmax"  # "softmax" | "sigmoid"
    num_expert_group: int | None = None  # grouped top-k: number of expert groups (None = no grouping)
    topk_group: int | None = None  # grouped top-k: groups kept per token
    routed_scaling_factor: float = 1.0  # multiplies the final weights (DeepSeek-V3 uses 2.5)
    # route on CUDA in one Triton launch (TREADLE_MOE_TRITON_ROUTER, read once when the layer is built)
    triton: bool = field(default_factory=envs.triton_router)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts ({self.num_experts}) must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be between 1 and num_experts ({self.num_experts}); "
                "check num_experts_per_tok in the model config"
            )
        if self.scoring not in SCORING_FUNCTIONS:
            raise ValueError(f"scoring {self.scoring!r} is unknown; valid: {', '.join(SCORING_FUNCTIONS)}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError(
                f"num_expert_group ({self.num_expert_group}) and topk_group ({self.topk_group}) must be set "
                "together for grouped top-k, or both left None"
            )
        if self.num_expert_group is not None and self.topk_group is not None:
            if self.num_experts % self.num_expert_group != 0:
                raise ValueError(
                    f"num_experts ({self.num_experts}) is not divisible by num_expert_group "
                    f"({self.num_expert_group}); groups must be equal-sized"
                )
            if not 1 <= self.topk_group <= self.num_expert_group:
                raise ValueError(
                    f"topk_group ({self.topk_group}) must be between 1 and num_expert_group "
                    f"({self.num_expert_group})"
                )
            eligible = self.topk_group * (self.num_experts // self.num_expert_group)
            if self.top_k > eligible:
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the {eligible} experts left eligible by topk_group "
                    f"({self.topk_group}) groups of {self.num_experts // self.num_expert_group}; raise topk_group"
                )

    @property
    def is_grouped(self) -> bool:
        return self.num_expert_group is not None

    def select(
        self, router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route: router_logits [T, E] -> (topk_weights [T, top_k] float32, topk_ids [T, top_k] int32)."""
        return select_experts(
            router_logits,
            top_k=self.top_k,
            renormalize=self.renormalize,
            scoring=self.scoring,
            num_expert_group=self.num_expert_group,
            topk_group=self.topk_group,
            correction_bias=correction_bias,
            routed_scaling_factor=self.routed_scaling_factor,
            use_triton=None if self.triton else False,
        )


def fused_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: Scoring = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain top-k routing: scores = softmax|sigmoid(logits), keep the k best (renormalized if asked)."""
    if scoring == "softmax" and renormalize:
        # softmax is monotonic and renormalising cancels its denominator: the k best logits, softmaxed among
        # themselves, are exactly the renormalised top-k of the full softmax -- in 3 kernels instead of 6
        # (topk over the logits as they are: widening bf16 to float32 is exact, so the picks are the same)
        top_logits, topk_ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.softmax(top_logits.float(), dim=-1), topk_ids.to(torch.int32)
    scores = _score(router_logits, scoring)  # [T, E] float32
    topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    num_expert_group: int,
    topk_group: int,
    scoring: Scoring = "softmax",
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek grouped routing: keep the `topk_group` best expert groups, then top-k within them."""
    num_tokens, num_experts = router_logits.shape
    scores = _score(router_logits, scoring)  # [T, E] float32
    choice = scores if correction_bias is None else scores + correction_bias.float()[None, :]
    grouped = choice.view(num_tokens, num_expert_group, num_experts // num_expert_group)  # [T, G, E/G]
    if correction_bias is None:
        group_scores = grouped.max(dim=-1).values  # [T, G]
    else:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
    group_ids = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
    masked = choice.masked_fill(~expert_mask, float("-inf"))
    topk_ids = torch.topk(masked, top_k, dim=-1).indices  # [T, top_k]
    topk_weights = scores.gather(1, topk_ids)  # weights come from the unbiased scores
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids.to(torch.int32)


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scoring: Scoring = "softmax",
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route every token: router_logits [T, E] -> (topk_weights float32, topk_ids int32), both [T, top_k].

    use_triton: the whole routing in one Triton launch (router_triton.py) instead of 5-12 torch ops; None = on
    CUDA, for up to 1,024 experts (RouterConfig passes False under TREADLE_MOE_TRITON_ROUTER=0)."""
    if router_logits.dim() != 2:
        raise ValueError(
            f"router_logits must be [num_tokens, num_experts], got shape {tuple(router_logits.shape)}"
        )
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k ({top_k}) must be between 1 and num_experts ({router_logits.shape[1]})")
    if use_triton is None:
        use_triton = router_logits.is_cuda and router_logits.shape[1] <= TRITON_MAX_EXPERTS
    if use_triton:
        from treadle_moe.router_triton import route_triton

        groups, kept = (num_expert_group, topk_group) if num_expert_group and topk_group else (1, 1)
        return route_triton(
            router_logits if router_logits.stride(1) == 1 else router_logits.contiguous(), top_k, renormalize,
            scoring == "sigmoid", groups, kept, correction_bias, routed_scaling_factor,
        )  # fmt: skip
    if num_expert_group is not None and topk_group is not None:
        topk_weights, topk_ids = grouped_topk(
            router_logits, top_k, renormalize, num_expert_group, topk_group, scoring, correction_bias
        )
    elif correction_bias is not None:
        # Bias-corrected selection without groups: one group holding every expert.
        topk_weights, topk_ids = grouped_topk(
            router_logits, top_k, renormalize, 1, 1, scoring, correction_bias
        )
    else:
        topk_weights, topk_ids = fused_topk(router_logits, top_k, renormalize, scoring)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids


def _score(router_logits: torch.Tensor, scoring: str) -> torch.Tensor:
    logits = router_logits.float()
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring {scoring!r} is unknown; valid: {', '.join(SCORING_FUNCTIONS)}")
