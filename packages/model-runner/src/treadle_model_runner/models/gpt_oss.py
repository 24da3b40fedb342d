"""gpt-oss (`GptOssForCausalLM`, model_type gpt_oss: gpt-oss-20b and gpt-oss-120b): a pre-norm decoder whose
attention layers carry learned sinks and alternate a sliding window with full attention, and whose every MLP is a
routed MoE with biased experts and a clamped SwiGLU.

One decoder layer, as transformers' GptOssDecoderLayer (treadle's Llama decoder stack, models/sparse_moe.py's
MoeModel, with sinks and the MoE below):
    h   = x + o_proj(attn(rope(q), rope(k), v; sinks))      q, k, v = split(qkv_proj(norm_in(x)))
    out = h + moe(norm_post(h))
Attention: q/k/v/o all have biases (`attention_bias`); `head_dim` from the config (64, narrower than hidden /
heads); YaRN rope (layers/rotary.py); layer i keeps a `sliding_window` (128) when `layer_types[i]` is
"sliding_attention", else attends to the whole sequence; `self_attn.sinks` [num_heads] adds one logit per head to
each softmax's denominator with no value:  p_j = exp(l_j) / (sum_i exp(l_i) + exp(sink_h)).
MoE:
    logits = router(y) (a linear layer with bias, [E], E = num_local_experts)
    E(y) = top num_experts_per_tok of the logits, w = softmax over those logits (= softmax over all, renormalized)
    moe(y) = sum_{e in E(y)} w_e * (swiglu_oai(y W13_e + b13_e) W2_e + b2_e)
    swiglu_oai(gate, up) = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),  g = min(gate, limit)
so each expert's down bias is weighted by its routing weight too. The experts are treadle_moe's FusedMoE with
`activation="swigluoai"` and its biases `w13_bias` [E, 2N] (gate's, then up's) and `w2_bias` [E, K].
Checkpoints (bf16 as transformers writes them, or the released MXFP4 experts) reach the FusedMoE layout through
gpt_oss_weights.py; MXFP4 experts stay 4-bit on CUDA (quantization/mxfp4_experts.py), else are dequantized.
Parallelism as the other MoE models (sparse_moe.py): heads and their sinks cut across tensor-parallel ranks, the
router replicated, the experts cut by intermediate columns (their w13 bias with them; the down bias held by rank 0
alone, since the ranks' partial outputs are summed; MXFP4 experts in whole blocks of 32) or, under expert
parallelism, held whole per rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from treadle_model_runner.layers.vocab import ParallelLMHead
from treadle_model_runner.models.gpt_oss_weights import GptOssCheckpoint
from treadle_model_runner.models.sparse_moe import MoeCausalLM, MoeModel, ParallelFusedMoE
from treadle_model_runner.parallel import all_reduce
from treadle_model_runner.quantization.mxfp4_experts import build_mxfp4_experts, keeps_mxfp4


class GptOssMoe(nn.Module):
    """router: hidden -> logits [T, E] (with bias); experts: the biased, clamped-SwiGLU FusedMoE."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, num_experts = int(config.hidden_size), int(config.num_local_experts)
        self.router = nn.Linear(hidden, num_experts, bias=True)

        def make() -> ParallelFusedMoE:
            return ParallelFusedMoE(num_experts, int(config.num_experts_per_tok), hidden, int(config.intermediate_size),
                                    renormalize=True, activation="swigluoai", swiglu_alpha=float(config.swiglu_alpha),
                                    swiglu_limit=float(config.swiglu_limit), bias=True)  # fmt: skip

        device = torch.get_default_device()
        # MXFP4 checkpoints on CUDA: the experts stay 4-bit (quantization/mxfp4_experts.py)
        self.experts = build_mxfp4_experts(make, device) if keeps_mxfp4(config, device) else make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.experts(x, self.router(x)))


class GptOssForCausalLM(MoeCausalLM):
    expert_width_field: ClassVar[str] = "intermediate_size"
    # the experts' biases in the files -> the FusedMoE parameters holding them (after gpt_oss_weights.py's reorder)
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (".mlp.experts.gate_up_proj_bias", ".mlp.experts.w13_bias"),
        (".mlp.experts.down_proj_bias", ".mlp.experts.w2_bias"),
    )
    # config.json's quantization_config may be quant_method "mxfp4" (the released experts): 4-bit on CUDA, else
    # dequantized at load
    loads_mxfp4: ClassVar[bool] = True
    has_attention_sinks: ClassVar[bool] = True

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        bias = bool(getattr(config, "attention_bias", True))
        self.model = MoeModel(config, max_position or config.max_position_embeddings, qk_norm=False,
                              make_mlp=lambda i: GptOssMoe(config), qkv_bias=bias, o_bias=bias, sinks=True)  # fmt: skip
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "the checkpoint"
    ) -> set[str]:
        """MoeCausalLM's loading, the expert tensors first put in FusedMoE's layout (gpt_oss_weights.py)."""
        checkpoint = GptOssCheckpoint(self)
        loaded = super().load_weights(checkpoint.convert(weights), source)
        checkpoint.log_experts()
        return loaded
