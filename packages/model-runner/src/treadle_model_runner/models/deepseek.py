"""DeepSeek-V2 / DeepSeek-V2-Lite (`DeepseekV2ForCausalLM`, model_type deepseek_v2) and DeepSeek-V3 / R1, Moonlight,
Kimi-K2 (`DeepseekV3ForCausalLM`, deepseek_v3): multi-head latent attention (deepseek_mla.py) and, past the first
`first_k_dense_replace` dense layers, a routed MoE MLP with shared experts.

One decoder layer, pre-norm, as transformers' DeepseekV2DecoderLayer / DeepseekV3DecoderLayer:
    h   = x + mla(norm_in(x))
    out = h + mlp(norm_post(h))
MLP: layer i is dense (a gated MLP of width `intermediate_size`) when i < first_k_dense_replace or, as DeepSeek's own
code and vLLM read `moe_layer_freq` (transformers ignores it; every released config has 1), i % moe_layer_freq != 0;
else
    moe(y) = sum_{e in E(y)} w_e * expert_e(y) + shared(y)       shared: one gated MLP of width
                                                                 n_shared_experts * moe_intermediate_size
routed by treadle_moe's router (router.py) over gate(y) in fp32 (the router's weight stays fp32, as transformers
keeps it):
- V2 (transformers' DeepseekV2TopkRouter): p = softmax; `topk_method` greedy: the top `num_experts_per_tok` of p;
  group_limited_greedy: only among the `topk_group` best of `n_group` groups, a group scored by its best p; then
  w_e = p_e * routed_scaling_factor, never renormalized (transformers' V2 reads no `norm_topk_prob`; the released
  V2 configs set it false, where DeepSeek's own code agrees);
- V3 (noaux_tc, DeepseekV3TopkRouter): GLM-4.5's routing (glm4_moe.py): s = sigmoid, selection on s +
  e_score_correction_bias within the `topk_group` best of `n_group` groups (scored by their two best biased scores),
  weights the unbiased s, renormalized when `norm_topk_prob`, times routed_scaling_factor.
Multi-token prediction (V3's `num_nextn_predict_layers`): those layers' tensors are skipped at load, as glm4_moe.py
does. Tensor parallelism: MLA's heads cut across ranks (deepseek_mla.py); the experts as in sparse_moe.py (their
columns, or whole experts under expert parallelism), the shared experts column/row-parallel, the routed and shared
partial sums all-reduced once; the router and its correction bias replicated.
fp8 weights (DeepSeek-V3 / R1's released block-wise checkpoints, others' per-channel ones, or --quantization fp8 /
dummy weights for such a config.json): every projection and routed expert runs fp8 as in the other models, except
kv_b_proj, which MLA reads whole as W_UK / W_UV: it stays in the model dtype, dequantized as it loads
(deepseek_weights.py). Refused by name before loading (runner/setup.py): LoRA adapters and 4-bit weights (whose
packed kv_b_proj MLA cannot read), and attention backends without a shared key/value cache (FlashInfer).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.layers.norm import RMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding
from treadle_model_runner.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from treadle_model_runner.loader.weights import CONFIG_FILE
from treadle_model_runner.models.deepseek_mla import MlaAttention, mla_rotary
from treadle_model_runner.models.deepseek_weights import dequantized_latent_up
from treadle_model_runner.models.glm4_moe import without_mtp_layers
from treadle_model_runner.models.sparse_moe import MoeCausalLM, ParallelFusedMoE
from treadle_model_runner.parallel import all_reduce
from treadle_model_runner.quantization.scheme import (
    Fp8CheckpointScheme,
    parse_quantization_config,
    quantization_config_of,
)

V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def v2_routing(config: Any) -> dict[str, Any]:
    """FusedMoE's router arguments for DeepSeek-V2's softmax routing (module docstring)."""
    method = getattr(config, "topk_method", None) or "greedy"
    if method not in V2_TOPK_METHODS:
        raise ValueError(
            f"DeepSeek-V2 topk_method {method!r} is not supported; supported: {', '.join(V2_TOPK_METHODS)} "
            "(noaux_tc routing is DeepSeek-V3's: use architectures DeepseekV3ForCausalLM)"
        )
    grouped = method == "group_limited_greedy"
    return dict(renormalize=False, scoring="softmax", num_expert_group=int(config.n_group) if grouped else None,
                topk_group=int(config.topk_group) if grouped else None)  # fmt: skip


def v3_routing(config: Any) -> dict[str, Any]:
    """FusedMoE's router arguments for DeepSeek-V3's biased sigmoid grouped routing (module docstring)."""
    return dict(renormalize=bool(config.norm_topk_prob), scoring="sigmoid", num_expert_group=int(config.n_group),
                topk_group=int(config.topk_group), use_correction_bias=True)  # fmt: skip


class DeepseekMoeBlock(nn.Module):
    """gate: fp32 hidden -> router logits [T, E]; experts: the routed FusedMoE; shared_experts: every token's MLP."""

    def __init__(self, config: Any, routing: dict[str, Any]) -> None:
        super().__init__()
        num_experts, hidden = int(config.n_routed_experts), int(config.hidden_size)
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=torch.float32)
        renormalize = routing.pop("renormalize")
        self.experts = ParallelFusedMoE(
            num_experts, int(config.num_experts_per_tok), hidden, int(config.moe_intermediate_size), renormalize,
            routed_scaling_factor=float(config.routed_scaling_factor), **routing,
        )  # fmt: skip
        shared_width = int(config.n_shared_experts or 0) * int(config.moe_intermediate_size)
        act = getattr(config, "hidden_act", "silu")
        self.shared_experts = GatedMLP(hidden, shared_width, act) if shared_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x.float()))
        if self.shared_experts is not None:
            out = out + self.shared_experts.partial(x)
        return all_reduce(out)


def is_moe_layer(config: Any, layer_idx: int) -> bool:
    freq = int(getattr(config, "moe_layer_freq", 1) or 1)
    return layer_idx >= int(config.first_k_dense_replace or 0) and layer_idx % freq == 0


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = MlaAttention(config, layer_idx, rotary_emb)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer: returns (this block's MLP output, the stream before it); each add is fused into the
        next norm (the input norm also into fused_qkv_a_proj)."""
        proj = self.self_attn.fused_qkv_a_proj
        if residual is None:
            residual, qkv_a = x, proj(self.input_layernorm(x))
        else:
            qkv_a, residual = self.input_layernorm.add_norm_linear(x, residual, proj)
        attn_out = self.self_attn(qkv_a, positions)
        if isinstance(self.mlp, GatedMLP):
            return self.mlp.forward_add_norm(attn_out, residual, self.post_attention_layernorm)
        h, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.mlp(h), residual


class DeepseekModel(nn.Module):
    def __init__(self, config: Any, max_position: int, routing: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = mla_rotary(config, max_position)

        def mlp(i: int) -> nn.Module:
            if is_moe_layer(config, i):
                return DeepseekMoeBlock(config, dict(routing))
            return GatedMLP(
                config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu")
            )

        layers = (
            DeepseekDecoderLayer(config, i, rotary_emb, mlp(i)) for i in range(config.num_hidden_layers)
        )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(h, positions, residual)
        # no layers
        if residual is None:
            return self.norm(h)
        return self.norm.add_and_norm(h, residual)[0]


class DeepseekV2ForCausalLM(MoeCausalLM):
    # x's two down-projections load into their shards of fused_qkv_a_proj (deepseek_mla.py); shared experts' and
    # dense MLPs' gate / up into gate_up_proj
    stacked_params: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("fused_qkv_a_proj", "q_proj", "q"),
        ("fused_qkv_a_proj", "q_a_proj", "q_a"),
        ("fused_qkv_a_proj", "kv_a_proj_with_mqa", "kv_a"),
        ("gate_up_proj", "gate_proj", "gate"),
        ("gate_up_proj", "up_proj", "up"),
    )
    has_latent_attention: ClassVar[bool] = True
    supports_lora: ClassVar[bool] = False
    quantization_methods: ClassVar[tuple[str, ...]] = ("fp8",)
    model: DeepseekModel  # type: ignore[assignment]

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings
        self.model = DeepseekModel(config, max_position, self.routing(config))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    @classmethod
    def routing(cls, config: Any) -> dict[str, Any]:
        return v2_routing(config)

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "the checkpoint"
    ) -> set[str]:
        """MoeCausalLM's loading, less the multi-token-prediction layers' tensors (module docstring), with an fp8
        kv_b_proj dequantized (deepseek_weights.py); a kv_b_proj of the wrong shape is named by the base loader (its
        full shape is per head D + V rows, L columns)."""
        weights = without_mtp_layers(type(self).__name__, self.config, weights)
        return super().load_weights(dequantized_latent_up(weights, self.weight_block()), source)

    def weight_block(self) -> tuple[int, int] | None:
        """The block size of config.json's block-wise fp8 quantization_config, else None."""
        raw = quantization_config_of(self.config)
        if raw is None:
            return None
        scheme = parse_quantization_config(raw, Path(CONFIG_FILE))
        return scheme.weight_block if isinstance(scheme, Fp8CheckpointScheme) else None


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    # the checkpoint keeps the correction bias beside the router's weight; here the FusedMoE routing with it holds it
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (".mlp.gate.e_score_correction_bias", ".mlp.experts.e_score_correction_bias"),
    )

    @classmethod
    def routing(cls, config: Any) -> dict[str, Any]:
        return v3_routing(config)
