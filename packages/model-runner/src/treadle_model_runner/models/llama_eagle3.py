"""The EAGLE-3 draft head (speculative_config method eagle3): one Llama-shaped layer over the target's features.

The target exposes its residual stream at three layers (models/llama.py, `LlamaModel.aux_layers`); `fc` mixes them
into one hidden state of the head's width. A draft row at position p pairs the token at p + 1 with a hidden state
for position p (the target's, or the head's own output at p in a drafting pass) and predicts the token at p + 2:
    e   = embed(token)                                   the target's embedding, shared
    x   = cat(input_layernorm(e), hidden_norm(hidden))   [T, 2H]: q, k and v take both halves
    h   = hidden + o_proj(attn(rope(q), rope(k), v))     rope at p; norm_before_residual: hidden_norm(hidden) joins
    out = h + mlp(post_attention_layernorm(h))           the hidden state the next pass is fed
    logits = lm_head(norm(out))                          [T, draft_vocab]; target id = draft id + d2t[draft id]
Its checkpoint (the EAGLE repo's layout, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B) names the layer `midlayer`, holds
`fc`, `norm`, `lm_head`, `d2t` (and `t2d`, unused) and usually no embedding (runner/eagle3_load.py reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from treadle_model_runner.layers.linear import Linear, StackedLinear
from treadle_model_runner.layers.norm import RMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.layers.vocab import ParallelLMHead
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.llama import LlamaSelfAttention, dense_mlp, head_dim_of

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
# checkpoint tensors the head does not read: the target -> draft vocabulary mask (d2t holds the mapping)
_UNUSED = ("t2d",)


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        hidden = int(config.hidden_size)
        self.self_attn = LlamaSelfAttention(config, 0, rotary_emb, bool(getattr(config, "attention_bias", False)),
                                            qk_norm=False)  # fmt: skip
        attn = self.self_attn
        # q, k and v read the embeddings and the hidden state side by side
        attn.qkv_proj = StackedLinear(
            2 * hidden,
            {"q": attn.q_size, "k": attn.kv_size, "v": attn.kv_size},
            attn.qkv_proj.bias is not None,
        )
        self.mlp = dense_mlp(config)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        h = residual + self.self_attn(self.self_attn.qkv_proj(x), positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3LlamaForCausalLM(CausalLM):
    """The head; `forward(input_ids, positions)` -> its output hidden states [T, H] (before `norm`), fed the hidden
    states in `hidden_in`."""

    def __init__(self, config: Any, max_position: int, target_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        hidden = int(config.hidden_size)
        self.draft_vocab_size = int(getattr(config, "draft_vocab_size", None) or config.vocab_size)
        rotary_emb = RotaryEmbedding(head_dim_of(config), max_position, rope_parameters(config))
        self.fc = Linear(3 * target_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(config, rotary_emb)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(hidden, self.draft_vocab_size)
        # [draft_vocab] int64: target token id = draft token id + d2t[draft id]
        self.d2t = nn.Parameter(torch.zeros(self.draft_vocab_size, dtype=torch.int64), requires_grad=False)
        # the target's embedding (runner/eagle3_load.py sets it; a plain attribute: not this head's parameters)
        self.__dict__["embed"] = None
        # [max tokens, H] the hidden states a forward reads, rows [0, T) (`allocate`; persistent, so a CUDA graph
        # replays over whatever the runner wrote there)
        self.hidden_in = torch.zeros(0, hidden)

    @property
    def tie_word_embeddings(self) -> bool:
        return False

    def share_embedding(self, embed: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.__dict__["embed"] = embed

    def combine(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The target's three layers' hidden states [T, 3 * H_target] -> the head's hidden state [T, H]."""
        return self.fc(aux_hidden)

    def allocate(self, max_num_tokens: int) -> None:
        """The `hidden_in` buffer for forwards of up to `max_num_tokens` tokens."""
        weight = self.fc.weight
        self.hidden_in = torch.zeros(
            max_num_tokens, weight.shape[0], dtype=weight.dtype, device=weight.device
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> the head's outputs [T, H], fed hidden_in[:T]."""
        embed = self.__dict__["embed"]
        assert embed is not None, "share_embedding() must run before the EAGLE-3 head's forward"
        return self.midlayer(embed(input_ids), self.hidden_in[: input_ids.shape[0]], positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's output hidden states [N, H] -> logits over the draft vocabulary [N, draft_vocab]."""
        return self.lm_head(self.norm(hidden))

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's argmax over the draft vocabulary, as a target token id."""
        ids = self.compute_logits(hidden).argmax(dim=-1)
        return ids + self.d2t.index_select(0, ids)

    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], source: str = "the checkpoint"
    ) -> set[str]:
        """The EAGLE repo's names: `midlayer.*`, `fc`, `norm`, `lm_head`, `d2t`; `t2d` is skipped."""
        return super().load_weights(((n, t) for n, t in weights if n not in _UNUSED), source)
