"""IBM Granite 3.x dense (`GraniteForCausalLM`): Llama with four scalars from the config.

    x0     = embed(ids) * embedding_multiplier
    h      = x + residual_multiplier * o_proj(attn(...))      softmax scale = attention_multiplier (not head_dim^-0.5)
    out    = h + residual_multiplier * mlp(norm_post(h))
    logits = lm_head(norm(out)) / logits_scaling
The multipliers scale whole block outputs, so a LoRA adapter's delta on o_proj or down_proj is scaled with them,
as in transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from treadle_model_runner.models.llama import LlamaForCausalLM, Multipliers


class GraniteForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__(config, max_position)
        self.logits_scaling = float(config.logits_scaling)

    @classmethod
    def multipliers(cls, config: Any) -> Multipliers:
        return Multipliers(
            embedding=float(config.embedding_multiplier),
            residual=float(config.residual_multiplier),
            attention=float(config.attention_multiplier),
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.logits_scaling
