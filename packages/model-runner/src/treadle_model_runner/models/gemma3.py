"""Gemma 2 and Gemma 3 (text): interleaved sliding-window and global attention layers, Gemma norms around both
blocks.

    x0  = embed(ids) * sqrt(hidden)                       (scale rounded to the model dtype, as HF does)
    h   = x + post_attn_norm(attn(input_norm(x)))         attention scale = query_pre_attn_scalar^-0.5,
    out = h + post_ff_norm(mlp(pre_ff_norm(h)))           Gemma 3: q/k Gemma-norms per head before rotary
    logits = cap * tanh(lm_head(final_norm(out)) / cap)   when final_logit_softcapping is set

Attention scores are soft-capped (cap * tanh(s / cap)) when `attn_logit_softcapping` is set (Gemma 2: 50), by
every attention backend. Gemma 2 has one rope for all layers and no q/k norms; otherwise the two are one model.

Layer i is sliding when `layer_types[i] == "sliding_attention"` (derived by the HF config from the legacy
`sliding_window_pattern`): window `sliding_window`, rope base `rope_local_base_freq` (the config's
"sliding_attention" rope parameters); global layers use the "full_attention" rope parameters (may be scaled).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.layers.norm import GemmaRMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.llama import attention_projections, head_dim_of, local_heads


def _layer_type(config: Any, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return str(layer_types[layer_idx])
    pattern = int(getattr(config, "sliding_window_pattern", 6))
    return "sliding_attention" if (layer_idx + 1) % pattern else "full_attention"


class Gemma3SelfAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = local_heads(config)
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj, self.o_proj = attention_projections(config, bias, bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        is_sliding = _layer_type(config, layer_idx) == "sliding_attention"
        self.rotary_emb = rotary_emb  # shared by every layer of this type (local or global base)
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.head_dim,
            float(config.query_pre_attn_scalar) ** -0.5,
            self.num_kv_heads,
            sliding_window=config.sliding_window if is_sliding else None,
            logits_soft_cap=getattr(config, "attn_logit_softcapping", None),
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim))).flatten(-2)
        self.rotary_emb.rotate_(positions, q, k)  # in place; q, k, v may be strided views of qkv
        return self.o_proj(self.attn(q, k, v))


def _gemma_rope(config: Any, layer_type: str) -> dict[str, Any]:
    """Rope of one layer type; configs from before transformers 5 name the local base `rope_local_base_freq`."""
    has_per_type = isinstance(getattr(config, "rope_parameters", None), dict)
    local_base = getattr(config, "rope_local_base_freq", None)
    if layer_type == "sliding_attention" and not has_per_type and local_base is not None:
        return {"rope_type": "default", "rope_theta": local_base}
    return rope_parameters(config, layer_type)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3SelfAttention(config, layer_idx, rotary_emb, qk_norm)
        self.mlp = GatedMLP(
            hidden, config.intermediate_size, getattr(config, "hidden_activation", "gelu_pytorch_tanh")
        )
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, config: Any, max_position: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        scale = torch.tensor(float(config.hidden_size) ** 0.5).to(torch.get_default_dtype())
        self.register_buffer("embed_scale", scale, persistent=False)
        ropes = {
            kind: RotaryEmbedding(head_dim_of(config), max_position, _gemma_rope(config, kind))
            for kind in ("sliding_attention", "full_attention")
        }
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, ropes[_layer_type(config, i)], qk_norm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids) * self.embed_scale
        for layer in self.layers:
            h = layer(h, positions)
        return self.norm(h)


class Gemma3ForCausalLM(CausalLM):
    qk_norm = True

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, max_position or config.max_position_embeddings, self.qk_norm)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)
        self.final_logit_softcapping: float | None = getattr(config, "final_logit_softcapping", None)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", True))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2: Gemma 3 without the q/k norms, with one rope for every layer (module docstring)."""

    qk_norm = False
