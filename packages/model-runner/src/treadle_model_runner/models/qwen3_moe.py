"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (RMSNorm on each q and k head before rotary) and a
sparse MoE MLP: softmax over `num_experts` router logits, top `num_experts_per_tok`, renormalized to sum 1 when
`norm_topk_prob`, experts of width `moe_intermediate_size`.

Which layers are sparse (as transformers decides): layer i is MoE unless i is in `mlp_only_layers`, there are no
experts, or (i + 1) is not a multiple of `decoder_sparse_step`; the others use a dense gated MLP of width
`intermediate_size`. Sliding-window attention applies only when the config enables it (transformers leaves
`sliding_window` None unless `use_sliding_window`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.layers.vocab import ParallelLMHead
from treadle_model_runner.models.sparse_moe import MoeCausalLM, MoeModel, SparseMoeBlock


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Whether decoder layer `layer_idx` of a Qwen3-MoE config has routed experts (else a dense MLP)."""
    dense_layers = getattr(config, "mlp_only_layers", None) or []
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return layer_idx not in dense_layers and config.num_experts > 0 and (layer_idx + 1) % step == 0


class Qwen3MoeForCausalLM(MoeCausalLM):
    qk_norm: ClassVar[bool] = True

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings

        def make_mlp(layer_idx: int) -> nn.Module:
            if is_sparse_layer(config, layer_idx):
                return self.sparse_block(config)
            return GatedMLP(
                config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu")
            )

        self.model = MoeModel(config, max_position, self.qk_norm, make_mlp, self.qkv_bias(config))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    @classmethod
    def sparse_block(cls, config: Any) -> nn.Module:
        """The MLP of a sparse layer."""
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob))  # fmt: skip

    @classmethod
    def qkv_bias(cls, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))
