"""Weight-and-reduce: fold the top_k expert outputs of a token into one hidden vector.

`out[m] = sum_j topk_weights[m, j] * y[m, j]` where `y[m, j]` is expert `topk_ids[m, j]` applied to token m.
Where this happens is a choice of the experts implementation, declared by `Experts.weight_and_reduce()`:

- `WeightAndReduceNoOp`: the experts already weighted and summed; their output is [M, K] (Triton fused MoE
  multiplies by the weight in the w2 GEMM epilogue and sums the top_k rows itself).
- `WeightAndReduceContiguous`: the experts return unweighted y as [M, top_k, K]; the finalize step weights
  (in float32) and sums. `weights_applied=True` only sums (experts weighted but did not reduce).
- `WeightAndReduceDelegate`: no preference; the PrepareFinalize substitutes its default (contiguous).

Invariant: `apply` writes the [M, K] result into `output` (when given) and returns it; it never changes its
inputs. An all-to-all PrepareFinalize may instead do the weighting inside its combine collective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class TopKWeightAndReduce(ABC):
    """Strategy object: how expert outputs become the layer output."""

    name: str = "abstract"

    @abstractmethod
    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Reduce fused_expert_output into output [M, K] (allocated when None) and return it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightAndReduceDelegate(TopKWeightAndReduce):
    """The experts do not care: the finalize step picks its own default strategy."""

    name = "delegate"

    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        raise AssertionError(
            "WeightAndReduceDelegate is a marker; PrepareFinalize must replace it before apply"
        )


class WeightAndReduceNoOp(TopKWeightAndReduce):
    """The experts produced the final [M, K] output already; copy it into `output` unless it is `output`."""

    name = "noop"

    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = topk_ids.shape[0]
        assert fused_expert_output.dim() == 2 and fused_expert_output.shape[0] == num_tokens, (
            f"NoOp reduce expects the experts' output as [M={num_tokens}, K], got {tuple(fused_expert_output.shape)}"
        )
        if output is None:
            return fused_expert_output
        if output.data_ptr() != fused_expert_output.data_ptr():
            output.copy_(fused_expert_output)
        return output


class WeightAndReduceContiguous(TopKWeightAndReduce):
    """fused_expert_output [M, top_k, K] (or [M * top_k, K]) -> sum_j w[m, j] * y[m, j], in float32."""

    name = "contiguous"

    def __init__(self, weights_applied: bool = False) -> None:
        self.weights_applied = weights_applied  # True: the experts already multiplied by topk_weights

    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens, top_k = topk_ids.shape
        hidden = fused_expert_output.shape[-1]
        y = fused_expert_output.reshape(num_tokens, top_k, hidden).float()  # [M, top_k, K]
        if not self.weights_applied:
            y = y * topk_weights.float().unsqueeze(-1)
        reduced = y.sum(dim=1)  # [M, K] float32
        if output is None:
            return reduced.to(fused_expert_output.dtype)
        output.copy_(reduced)
        return output

    def __repr__(self) -> str:
        return f"WeightAndReduceContiguous(weights_applied={self.weights_applied})"
