"""OLMo 2 (`Olmo2ForCausalLM`): Llama attention and MLP with the norms after each block instead of before it.

One decoder layer (no input norm):
    h   = x + norm_attn(o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)))     q, k, v = split(qkv_proj(x))
    out = h + norm_ff(down(silu(gate(h)) * up(h)))
q_norm and k_norm are RMSNorms over the whole q and k projections (every head at once, unlike Qwen3's per-head
norms), before rotary. Under tensor parallelism a rank holds some heads only, so they are `ShardedRMSNorm`s: each
rank keeps its columns of the weight and the mean of squares is summed over the ranks.
Norm numerics: transformers' Olmo2RMSNorm multiplies by the weight in fp32 before rounding, our RMSNorm op after
rounding (Llama's order), as vLLM does; the two agree in fp32 and differ by one rounding in 16-bit dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from treadle_model_runner.layers.norm import RMSNorm, ShardedRMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.llama import LlamaSelfAttention, dense_mlp, head_dim_of


class Olmo2Attention(LlamaSelfAttention):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__(config, layer_idx, rotary_emb, bool(getattr(config, "attention_bias", False)), False)
        heads, kv_heads, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
        self.q_norm = ShardedRMSNorm(heads * self.head_dim, self.qkv_proj.rank_rows("q"), eps)
        self.k_norm = ShardedRMSNorm(kv_heads * self.head_dim, self.qkv_proj.rank_rows("k"), eps)

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.q_norm is not None and self.k_norm is not None, "OLMo 2 always norms q and k"
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)  # fresh tensors: the backend may rotate them in place
        return self.o_proj(self.attn(q, k, v, rope=self.rotary_emb.rope(positions)))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx, rotary_emb)
        self.mlp = dense_mlp(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        attn_out = self.self_attn(self.self_attn.qkv_proj(x), positions)
        h = x + self.post_attention_layernorm(attn_out)
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Olmo2Model(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(head_dim_of(config), max_position, rope_parameters(config))
        self.layers = nn.ModuleList(
            Olmo2DecoderLayer(config, i, rotary_emb) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions)
        return self.norm(h)


class Olmo2ForCausalLM(CausalLM):
    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Olmo2Model(config, max_position or config.max_position_embeddings)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)
