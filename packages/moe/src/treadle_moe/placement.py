"""Expert placement: which of a layer's experts this rank holds under expert parallelism.

With expert parallelism the `ep_size` ranks of a group each hold whole experts instead of a slice of every
expert: rank r holds the contiguous range [r * E / ep_size, (r + 1) * E / ep_size) (vLLM's linear placement), so E
must be a multiple of ep_size. The router still scores all E experts on every rank (its gate is replicated, and so
are the activations); `to_local_ids` turns its global expert ids into this rank's local ones, with -1 for a slot
routed to another rank's expert. The experts skip such slots (they contribute zero), so each rank's output is the
sum over its own experts, and the sum over the ranks (one all-reduce, as under tensor parallelism) is the layer.
A rank's expert sees the load it would on one device (M * top_k / E slots), so the Triton experts pick block configs
for all E experts (the tuned table and heuristic of the one-device layer: MoEProblem.routed_experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertPlacement"]


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """The experts one rank holds: global ids [first, first + num_local) of num_experts."""

    num_experts: int  # experts of the layer (what the router routes over)
    first: int  # global id of this rank's first expert
    num_local: int  # experts this rank holds

    @classmethod
    def linear(cls, num_experts: int, ep_rank: int = 0, ep_size: int = 1) -> ExpertPlacement:
        """Rank `ep_rank` of `ep_size` holds the `ep_rank`-th contiguous range of num_experts / ep_size experts."""
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"expert-parallel rank {ep_rank} is outside a group of size {ep_size}")
        if num_experts % ep_size:
            raise ValueError(
                f"num_experts ({num_experts}) is not divisible by the expert-parallel size ({ep_size}): each rank "
                "must hold the same number of whole experts; use a tensor_parallel_size that divides "
                f"{num_experts}, or turn expert parallelism off (each rank then holds a slice of every expert)"
            )
        num_local = num_experts // ep_size
        return cls(num_experts, ep_rank * num_local, num_local)

    @property
    def is_partial(self) -> bool:
        """Whether some experts live on other ranks (so some routed slots are skipped here)."""
        return self.num_local != self.num_experts

    @property
    def local_experts(self) -> range:
        """The global ids of this rank's experts."""
        return range(self.first, self.first + self.num_local)

    def local_id(self, expert: int) -> int | None:
        """This rank's index of global expert `expert`; None when another rank holds it."""
        local = expert - self.first
        return local if 0 <= local < self.num_local else None

    def to_local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids [M, top_k] -> local ids (same shape and dtype), -1 where another rank's expert."""
        if not self.is_partial:
            return topk_ids
        local = topk_ids - self.first
        held = (local >= 0) & (local < self.num_local)
        return torch.where(held, local, torch.full_like(local, -1))
