"""Mixtral (8x7B, 8x22B): Llama/Mistral attention (optional sliding window over every layer) and a sparse MoE MLP
on every layer: softmax over `num_local_experts` router logits, top `num_experts_per_tok`, always renormalized
to sum 1, experts of width `intermediate_size` (checkpoint names `w1` gate, `w3` up, `w2` down).

Checkpoints name the MoE block `block_sparse_moe` (transformers 5 calls it `mlp` in memory); both load.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from treadle_model_runner.layers.vocab import ParallelLMHead
from treadle_model_runner.models.sparse_moe import MoeCausalLM, MoeModel, SparseMoeBlock


class MixtralForCausalLM(MoeCausalLM):
    expert_width_field: ClassVar[str] = "intermediate_size"
    expert_proj_names: ClassVar[dict[str, str]] = {"w1": "w1", "w3": "w3", "w2": "w2"}
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ((".block_sparse_moe.", ".mlp."),)

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings

        def make_mlp(layer_idx: int) -> nn.Module:
            return SparseMoeBlock(
                config.hidden_size,
                config.num_local_experts,
                config.num_experts_per_tok,
                config.intermediate_size,
                renormalize=True,
            )

        self.model = MoeModel(config, max_position, qk_norm=False, make_mlp=make_mlp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)
