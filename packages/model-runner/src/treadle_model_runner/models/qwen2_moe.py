"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (bias on q, k, v) and, on MoE layers, routed
experts plus one shared expert that every token goes through, scaled by its own sigmoid gate:

    moe(y) = sum_{e in topk(softmax(gate(y)))} w_e * expert_e(y)  +  sigmoid(shared_expert_gate(y)) * shared_expert(y)

Routing as Qwen3-MoE (top `num_experts_per_tok` of `num_experts`, renormalized when `norm_topk_prob`; experts of
width `moe_intermediate_size`); the shared expert is a dense gated MLP of width `shared_expert_intermediate_size`.
Which layers are sparse follows the same rule as Qwen3-MoE (`mlp_only_layers`, `decoder_sparse_step`); the others
use a dense MLP of width `intermediate_size`. Sliding windows only on the layers transformers marks sliding
(`use_sliding_window`).
Tensor parallelism: the shared expert is column/row-parallel like any dense MLP, the routed experts sliced as in
sparse_moe.py (or, with enable_expert_parallel, whole experts per rank), the two gates replicated. The sigmoid gate
is the same on every rank, so it scales the shared expert's partial sum before the sum over the ranks: the block adds
it to the routed experts' partial sum and all-reduces once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.models.qwen3_moe import Qwen3MoeForCausalLM
from treadle_model_runner.models.sparse_moe import SparseMoeBlock
from treadle_model_runner.parallel import all_reduce


class SharedExpertMoeBlock(SparseMoeBlock):
    def __init__(self, config: Any) -> None:
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob))  # fmt: skip
        act = getattr(config, "hidden_act", "silu")
        self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size, act)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.partial(x)
        return all_reduce(self.experts(x, self.gate(x)) + shared)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE's stack without q/k norms, with qkv bias and the shared expert."""

    qk_norm: ClassVar[bool] = False

    @classmethod
    def sparse_block(cls, config: Any) -> nn.Module:
        return SharedExpertMoeBlock(config)

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "qkv_bias", True))  # configs from before the field always had the bias
