"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (`Glm4MoeForCausalLM`, model_type glm4_moe): Llama's decoder stack with GQA
attention and, past the first `first_k_dense_replace` dense layers, a DeepSeek-V3-style MoE MLP.

One decoder layer, pre-norm, as transformers' Glm4MoeDecoderLayer:
    h   = x + o_proj(attn(rope(q), rope(k), v))      q, k, v = split(qkv_proj(norm_in(x)))
    out = h + mlp(norm_post(h))
Attention: `attention_bias` puts a bias on q, k and v only (o_proj has none); with `use_qk_norm` an RMSNorm over each
q and k head before rotary; partial rotary: the first `partial_rotary_factor` (0.5 in the real configs) of each head's
`head_dim` dims rotate, rotate_half layout (layers/rotary.py reads it from rope_parameters). The real models' heads are
wider than the hidden size (GLM-4.5: 96 x 128 > 5120).
MLP: layers below `first_k_dense_replace` have a dense gated MLP of width `intermediate_size`; the others
    moe(y) = sum_{e in E(y)} w_e * expert_e(y) + shared(y)
    s = sigmoid(gate(y)) in fp32 [E], E = n_routed_experts
    E(y): the top `num_experts_per_tok` of s + e_score_correction_bias among the experts of the `topk_group` best of
          `n_group` equal groups, a group scored by the sum of its two best biased scores
    w_e = s_e (the unbiased score) / sum_{E(y)} s, when `norm_topk_prob`; then times `routed_scaling_factor`
which is treadle_moe's sigmoid grouped top-k with a correction bias (router.py), in that order. `shared` is one gated
MLP of width n_shared_experts * moe_intermediate_size, ungated. The router's weight and the correction bias stay fp32
whatever the model dtype, and the router reads fp32 activations, as transformers (`_keep_in_fp32_modules_strict`) and
vLLM do. The checkpoint's `mlp.gate.e_score_correction_bias` is loaded into the FusedMoE that routes with it.
Multi-token prediction: the checkpoints also hold `num_nextn_predict_layers` MTP layers, stored as decoder layers
`model.layers.{num_hidden_layers + i}.*`; treadle does not run them, so they are neither built nor loaded (their
tensors are skipped at load, and logged).
Parallelism as Qwen2-MoE (qwen2_moe.py): the routed experts cut across tensor-parallel ranks or held whole per rank
(expert parallelism), the shared experts column/row-parallel, the router and its bias replicated; the routed and
shared partial sums are added and all-reduced once. fp8 (online or checkpoint) and LoRA reach the projections and
experts as for Qwen3-MoE; the router stays unquantized.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.layers.vocab import ParallelLMHead
from treadle_model_runner.models.sparse_moe import MoeCausalLM, MoeModel, ParallelFusedMoE
from treadle_model_runner.parallel import all_reduce

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def num_mtp_layers(config: Any) -> int:
    """The multi-token-prediction layers a checkpoint stores past the decoder layers (transformers 5 also calls the
    field num_mtp_layers)."""
    value = getattr(config, "num_nextn_predict_layers", None)
    return int(value if value is not None else getattr(config, "num_mtp_layers", 0) or 0)


def without_mtp_layers(
    model: str, config: Any, weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors less those of its multi-token-prediction layers (treadle does not run MTP), their
    number logged for `model`."""
    first = int(config.num_hidden_layers)
    mtp = range(first, first + num_mtp_layers(config))
    skipped = 0
    for name, tensor in weights:
        layer = _LAYER.match(name)
        if layer is not None and int(layer[1]) in mtp:
            skipped += 1
            continue
        yield name, tensor
    if skipped:
        logger.info(
            "%s: skipped %d tensors of the multi-token-prediction layers %d-%d (num_nextn_predict_layers %d; "
            "treadle does not run MTP)", model, skipped, mtp.start, mtp.stop - 1, len(mtp),
        )  # fmt: skip


class Glm4MoeBlock(nn.Module):
    """gate: fp32 hidden -> router logits [T, E]; experts: the routed FusedMoE; shared_experts: the dense MLP every
    token goes through."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts, hidden = int(config.n_routed_experts), int(config.hidden_size)
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32)
        self.experts = ParallelFusedMoE(
            num_experts,
            int(config.num_experts_per_tok),
            hidden,
            int(config.moe_intermediate_size),
            renormalize=bool(config.norm_topk_prob),
            scoring="sigmoid",
            num_expert_group=int(config.n_group),
            topk_group=int(config.topk_group),
            routed_scaling_factor=float(config.routed_scaling_factor),
            use_correction_bias=True,
        )
        shared_width = int(config.n_shared_experts) * int(config.moe_intermediate_size)
        act = getattr(config, "hidden_act", "silu")
        self.shared_experts = GatedMLP(hidden, shared_width, act) if shared_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x.float()))
        if self.shared_experts is not None:
            out = out + self.shared_experts.partial(x)
        return all_reduce(out)


class Glm4MoeForCausalLM(MoeCausalLM):
    # the checkpoint keeps the correction bias beside the router's weight; here the FusedMoE routing with it holds it
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (".mlp.gate.e_score_correction_bias", ".mlp.experts.e_score_correction_bias"),
    )

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings
        first_sparse = int(config.first_k_dense_replace)

        def make_mlp(layer_idx: int) -> nn.Module:
            if layer_idx >= first_sparse:
                return Glm4MoeBlock(config)
            return GatedMLP(
                config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu")
            )

        qkv_bias = bool(getattr(config, "attention_bias", False))
        # GLM's attention_bias covers q, k and v only (Llama's also o_proj)
        self.model = MoeModel(
            config, max_position, bool(config.use_qk_norm), make_mlp, qkv_bias, o_bias=False
        )
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "the checkpoint"
    ) -> set[str]:
        """MoeCausalLM's loading, less the multi-token-prediction layers' tensors (module docstring)."""
        return super().load_weights(without_mtp_layers(type(self).__name__, self.config, weights), source)
