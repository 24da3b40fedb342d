"""PrepareFinalize: move tokens to their experts before the expert GEMMs and back after them.

A modular MoE kernel runs `prepare -> experts.apply -> finalize`. Prepare ("dispatch") turns the layer input
into the activation format the experts consume; finalize ("combine") turns the expert outputs back into one
[M, K] hidden state per token, weighting and summing the top_k contributions. Dispatch and combine live in one
class because an expert-parallel implementation must pair them on the same collective (an all-to-all sends
each token to the rank owning its expert and the matching all-to-all brings the results back); the `handle`
field of `PrepareResult` is where such an implementation keeps its routing state between the two calls.

Activation formats:
- STANDARD: hidden [M, K] with topk_ids / topk_weights [M, top_k]; the experts do their own grouping.
- BATCHED: hidden [E, max_tokens, K] with expert_num_tokens [E]: row r < expert_num_tokens[e] of slab e is
  a token routed to expert e; rows past it are undefined and must be ignored.

The single-device implementations here (no all-to-all) are the identity dispatch (standard) and a scatter into
per-expert slabs (batched); both combine with the weight-and-reduce strategy of the experts. Under expert
parallelism without an all-to-all (treadle_moe/placement.py: every rank sees every token and holds some experts),
topk_ids hold -1 for slots of other ranks' experts: the standard format hands them to the experts, which skip them;
the batched one puts them in no slab and combines zeros for them.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from treadle_moe.topk_weight_and_reduce import (
    TopKWeightAndReduce,
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
)


class ActivationFormat(enum.Enum):
    STANDARD = "standard"  # [M, K] + topk ids/weights [M, top_k]
    BATCHED = "batched"  # [E, max_tokens, K] + expert_num_tokens [E]


@dataclass(slots=True)
class PrepareResult:
    """What prepare hands to the experts (and, through `handle`, to finalize)."""

    hidden: torch.Tensor  # STANDARD: [M, K]; BATCHED: [E, max_tokens, K]
    topk_weights: torch.Tensor  # [M, top_k] float32, routing weights of the tokens this rank holds
    topk_ids: torch.Tensor  # [M, top_k] int32, global expert ids
    expert_num_tokens: torch.Tensor | None  # BATCHED: [E] int32 valid rows per slab; STANDARD: None
    handle: Any = (
        None  # implementation state for finalize (batched: slot coordinates; all-to-all: comm handle)
    )


class PrepareFinalize(ABC):
    """Dispatch/combine pair. Subclasses declare their format and whether they span devices."""

    name: str = "abstract"
    activation_format: ActivationFormat = ActivationFormat.STANDARD
    is_expert_parallel: bool = False  # True for all-to-all implementations

    @abstractmethod
    def prepare(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
    ) -> PrepareResult:
        """hidden [M, K], topk [M, top_k] -> the experts' input in `activation_format`."""

    @abstractmethod
    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        prepared: PrepareResult,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> None:
        """Combine the experts' output into output [M, K] (in place)."""

    def max_tokens_per_expert(self, num_tokens: int) -> int:
        """BATCHED formats: rows per expert slab for `num_tokens` tokens (STANDARD: num_tokens)."""
        return num_tokens

    def describe(self) -> str:
        return f"{self.name} ({self.activation_format.value} format, {'expert parallel' if self.is_expert_parallel else 'single device'})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoEPStandardPrepareFinalize(PrepareFinalize):
    """Single device, standard format: dispatch is the identity, combine is the weight-and-reduce."""

    name = "no_ep_standard"
    activation_format = ActivationFormat.STANDARD

    def prepare(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
    ) -> PrepareResult:
        _check_routing(hidden, topk_weights, topk_ids)
        return PrepareResult(hidden, topk_weights, topk_ids, expert_num_tokens=None)

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        prepared: PrepareResult,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> None:
        if isinstance(weight_and_reduce, WeightAndReduceDelegate):
            weight_and_reduce = WeightAndReduceContiguous()
        weight_and_reduce.apply(output, fused_expert_output, prepared.topk_weights, prepared.topk_ids)


@dataclass(frozen=True, slots=True)
class _BatchedSlots:
    expert: torch.Tensor  # [M * top_k] int64, slab of each (token, k) slot
    rank: torch.Tensor  # [M * top_k] int64, row of each (token, k) slot inside its slab
    # [M * top_k] bool, False for a slot of expert -1 (its expert and rank are 0; output zero)
    held: torch.Tensor


class NoEPBatchedPrepareFinalize(PrepareFinalize):
    """Single device, batched format: scatter tokens into per-expert slabs, gather them back to combine.

    `max_tokens_per_expert=None` sizes every slab for the worst case (all M tokens on one expert), which needs
    no host synchronization; a smaller cap saves memory and raises a ValueError when an expert overflows it.
    """

    name = "no_ep_batched"
    activation_format = ActivationFormat.BATCHED

    def __init__(self, max_tokens_per_expert: int | None = None) -> None:
        if max_tokens_per_expert is not None and max_tokens_per_expert < 1:
            raise ValueError(f"max_tokens_per_expert ({max_tokens_per_expert}) must be >= 1 or None")
        self.cap = max_tokens_per_expert

    def max_tokens_per_expert(self, num_tokens: int) -> int:
        return num_tokens if self.cap is None else min(self.cap, num_tokens)

    def prepare(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
    ) -> PrepareResult:
        _check_routing(hidden, topk_weights, topk_ids)
        num_tokens, top_k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1).long()  # [M * top_k]
        held = flat_ids >= 0  # -1: another rank's expert; such slots go to an extra slab E, dropped
        flat_ids = torch.where(held, flat_ids, num_experts)
        counts_all = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_ids.device)
        # [E + 1], no host sync (unlike bincount)
        counts_all.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        counts = counts_all[:num_experts]
        max_tokens = self.max_tokens_per_expert(num_tokens)
        if self.cap is not None and num_tokens > self.cap:
            busiest = int(counts.max().item())
            if busiest > max_tokens:
                raise ValueError(
                    f"an expert received {busiest} tokens but max_tokens_per_expert is {max_tokens}: the batched "
                    "slabs would overflow; raise max_tokens_per_expert or use the standard format"
                )
        order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert, token order kept
        starts = torch.cumsum(counts_all, 0) - counts_all  # [E + 1] first sorted position of each expert
        sorted_rank = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts[flat_ids[order]]
        rank = torch.empty_like(flat_ids)
        rank[order] = sorted_rank
        rank = torch.where(held, rank, 0)  # the skipped slots all overwrite row 0 of slab E
        slabs = hidden.new_empty(num_experts + 1, max_tokens, hidden.shape[1])  # [E + 1, max_tokens, K]
        token_of_slot = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)
        slabs[flat_ids, rank] = hidden[token_of_slot]
        return PrepareResult(
            slabs[:num_experts],
            topk_weights,
            topk_ids,
            expert_num_tokens=counts.to(torch.int32),
            handle=_BatchedSlots(torch.where(held, flat_ids, 0), rank, held),
        )

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        prepared: PrepareResult,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> None:
        slots = prepared.handle
        assert isinstance(slots, _BatchedSlots), "finalize needs the PrepareResult that prepare returned"
        num_tokens, top_k = prepared.topk_ids.shape
        gathered = fused_expert_output[slots.expert, slots.rank]  # [M * top_k, K]
        gathered = torch.where(slots.held[:, None], gathered, 0).view(num_tokens, top_k, -1)  # [M, top_k, K]
        if isinstance(weight_and_reduce, WeightAndReduceDelegate):
            weight_and_reduce = WeightAndReduceContiguous()
        weight_and_reduce.apply(output, gathered, prepared.topk_weights, prepared.topk_ids)


def _check_routing(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [num_tokens, hidden_size], got shape {tuple(hidden.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
            f"[num_tokens={hidden.shape[0]}, top_k]"
        )
