"""Llama-family decoders: Llama 3.x (llama3 rope scaling), SmolLM2, Mistral (optional sliding window); Qwen2 and
Qwen3 reuse these blocks with qkv bias and q/k norms switched on (see qwen.py).

One decoder layer, pre-norm:
    h   = x + o_proj(attn(rope(q), rope(k), v))      q, k, v = split(qkv_proj(norm_in(x)))
    out = h + down(silu(gate(norm_post(h))) * up(norm_post(h)))
q/k norm (Qwen3) is an RMSNorm over each head's dims, applied before rotary. Granite puts scalars on this shape
(`Multipliers`): the embeddings times `embedding`, each block's output times `residual` before it joins the stream,
`attention` as the softmax scale. A NoPE layer (SmolLM3's `no_rope_layers`) attends on q and k unrotated.
Under tensor parallelism each rank runs its share of the query and key/value heads (treadle_model_runner.parallel).
Each residual add runs fused into the norm after it, and each norm into the projection after it
(`add_norm_linear`): for a one-row decode step one GPU kernel streams the projection's weight with the norm
applied to its input on the fly (more rows: the norm kernel, then cuBLAS; see treadle_kernels.ops.linear).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.layers.linear import RowParallelLinear, StackedLinear
from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.layers.norm import RMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from treadle_model_runner.models.aux_hidden import layers_keeping_aux
from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.parallel import get_tp


@dataclass(frozen=True)
class Multipliers:
    """Scalars a family puts on the Llama residual stream (Granite's); the defaults change nothing."""

    embedding: float = 1.0  # x0 = embed(ids) * embedding
    residual: float = 1.0  # each block adds residual * its output to the stream
    attention: float | None = None  # the softmax scale; None = head_dim ** -0.5


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def local_heads(config: Any) -> tuple[int, int]:
    """(query heads, key/value heads) this tensor-parallel rank runs. With fewer key/value heads than ranks, each
    is replicated on size / num_key_value_heads consecutive ranks (one head each). ValueError when the group size
    divides neither way."""
    tp, kv = get_tp(), int(config.num_key_value_heads)
    heads = tp.shard(config.num_attention_heads, "num_attention_heads")
    if kv < tp.size:
        if tp.size % kv:
            raise ValueError(
                f"num_key_value_heads ({kv}) neither divides nor is divisible by tensor_parallel_size ({tp.size}); "
                "use a tensor_parallel_size that divides it or is a multiple of it"
            )
        return heads, 1
    return heads, tp.shard(kv, "num_key_value_heads")


def attention_projections(
    config: Any, qkv_bias: bool, o_bias: bool
) -> tuple[StackedLinear, RowParallelLinear]:
    """qkv_proj (this rank's query heads and key/value heads, stacked) and o_proj (row-parallel) of one layer."""
    tp, head_dim = get_tp().size, head_dim_of(config)
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    kv_replicas = max(1, tp // config.num_key_value_heads)
    qkv = StackedLinear(config.hidden_size, {"q": q, "k": kv, "v": kv}, qkv_bias, parallel=True,
                        replicas={"k": kv_replicas, "v": kv_replicas})  # fmt: skip
    return qkv, RowParallelLinear(q, config.hidden_size, bias=o_bias)


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The layer's sliding window in tokens (key pos > query pos - W), or None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class LlamaSelfAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        qk_norm: bool,
        scale: float | None = None,
        use_rope: bool = True,
        o_bias: bool | None = None,
        sinks: bool = False,
    ) -> None:
        """`scale`: the softmax scale (None: head_dim ** -0.5); `use_rope` False: a NoPE layer, whose q and k
        reach attention unrotated (`rotary_emb` is then kept but never applied); `o_bias`: whether o_proj has a
        bias (None: config.attention_bias decides); `sinks`: one learned sink logit per query head (gpt-oss),
        `self.sinks` [this rank's heads], which every softmax also weighs (layers/attention.py)."""
        super().__init__()
        self.num_heads, self.num_kv_heads = local_heads(config)
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # attention_bias (Llama, Qwen3) covers q, k, v and o; Qwen2's always-on bias and GLM-4.5's attention_bias
        # cover q, k, v only
        if o_bias is None:
            o_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj, self.o_proj = attention_projections(config, qkv_bias, o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb  # shared by every layer (one cos/sin table)
        self.use_rope = use_rope
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if sinks else None
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5 if scale is None else scale,
            self.num_kv_heads,
            sliding_window=sliding_window_of(config, layer_idx),
            sinks=self.sinks,
        )
        self.tp_rank, self.num_all_heads = get_tp().rank, int(config.num_attention_heads)

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The checkpoint's shape of `sinks` (every head's), the one parameter this module holds itself."""
        assert name == "sinks", f"LlamaSelfAttention holds no {name} of its own"
        return (self.num_all_heads,)

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's query heads' sinks (the heads are cut across ranks in order)."""
        assert name == "sinks", f"LlamaSelfAttention holds no {name} of its own"
        return full.narrow(0, self.tp_rank * self.num_heads, self.num_heads)

    def forward(self, qkv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """qkv: this block's qkv_proj output (the layer runs qkv_proj fused with its input norm)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (self.num_kv_heads, self.head_dim))).flatten(-2)
        # q, k, v stay views of the qkv buffer (row stride q + 2 kv): rotary, the KV-cache write and attention
        # all read strided rows, so no copy kernel runs; the backend rotates q and k (in place, or fused into
        # its decode kernel), which is safe: qkv is this step's own. A NoPE layer hands over no rope: the
        # backend's plain path (no rotary op, no fused rope kernel)
        rope = self.rotary_emb.rope(positions) if self.use_rope else None
        return self.o_proj(self.attn(q, k, v, rope=rope))


def dense_mlp(config: Any) -> nn.Module:
    act, mlp_bias = getattr(config, "hidden_act", "silu"), bool(getattr(config, "mlp_bias", False))
    return GatedMLP(config.hidden_size, config.intermediate_size, act, bias=mlp_bias)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_idx: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        qk_norm: bool,
        mlp: nn.Module | None = None,
        multipliers: Multipliers = Multipliers(),
        use_rope: bool = True,
        o_bias: bool | None = None,
        sinks: bool = False,
    ) -> None:
        """`mlp`: the layer's MLP (a routed MoE block in sparse models); None = the dense gated MLP. `use_rope`
        False: a NoPE layer (no rotary embedding); `o_bias`, `sinks`: LlamaSelfAttention's."""
        super().__init__()
        self.self_attn = LlamaSelfAttention(
            config, layer_idx, rotary_emb, qkv_bias, qk_norm, multipliers.attention, use_rope, o_bias, sinks
        )
        self.mlp = mlp if mlp is not None else dense_mlp(config)
        self.residual_multiplier = multipliers.residual
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's output (the embeddings when residual is None); residual: the stream before
        it. Returns (this block's MLP output, the stream before it): each add is fused into the next norm."""
        qkv_proj = self.self_attn.qkv_proj
        if residual is None:
            residual, qkv = x, qkv_proj(self.input_layernorm(x))
        else:
            qkv, residual = self.input_layernorm.add_norm_linear(x, residual, qkv_proj)
        attn_out = self.scaled(self.self_attn(qkv, positions))
        if isinstance(self.mlp, GatedMLP):
            out, residual = self.mlp.forward_add_norm(attn_out, residual, self.post_attention_layernorm)
        else:
            h, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
            out = self.mlp(h)
        return self.scaled(out), residual

    def scaled(self, block_out: torch.Tensor) -> torch.Tensor:
        """A block's output as it joins the residual stream (times Granite's residual multiplier)."""
        return block_out if self.residual_multiplier == 1.0 else block_out * self.residual_multiplier


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm; `make_mlp(layer_idx)` gives a layer's MLP (None: dense);
    `nope_layers`: the indices of the layers that apply no rotary embedding; `o_bias`, `sinks`:
    LlamaSelfAttention's."""

    def __init__(
        self,
        config: Any,
        max_position: int,
        qkv_bias: bool,
        qk_norm: bool,
        make_mlp: Callable[[int], nn.Module] | None = None,
        multipliers: Multipliers = Multipliers(),
        nope_layers: Collection[int] = (),
        o_bias: bool | None = None,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.embedding_multiplier = multipliers.embedding
        rotary_emb = RotaryEmbedding(head_dim_of(config), max_position, rope_parameters(config))

        def layer(i: int) -> LlamaDecoderLayer:
            mlp = make_mlp(i) if make_mlp else None
            rope = i not in nope_layers
            return LlamaDecoderLayer(
                config, i, rotary_emb, qkv_bias, qk_norm, mlp, multipliers, rope, o_bias, sinks
            )

        self.layers = nn.ModuleList(layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # EAGLE-3 (models/aux_hidden.py): the layers whose input residual stream each forward writes, side by side
        # in this order, into rows [0, T) of the persistent `aux_hidden` [max tokens, len(aux_layers) * hidden]
        # (a replayed CUDA graph writes it too); () keeps nothing
        self.aux_layers: tuple[int, ...] = ()
        self.aux_hidden: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier != 1.0:
            h = h * self.embedding_multiplier
        if self.aux_layers:
            h, residual = layers_keeping_aux(self, h, positions)
        else:
            for layer in self.layers:
                h, residual = layer(h, positions, residual)
        if residual is None:  # no layers
            return self.norm(h)
        return self.norm.add_and_norm(h, residual)[0]


class LlamaForCausalLM(CausalLM):
    qkv_bias_default = False  # Llama/Mistral: config.attention_bias decides
    qk_norm = False

    def __init__(self, config: Any, max_position: int | None = None) -> None:
        super().__init__()
        self.config = config
        max_position = max_position or config.max_position_embeddings
        qkv_bias = bool(getattr(config, "attention_bias", False)) or self.qkv_bias_default
        multipliers, nope_layers = self.multipliers(config), self.nope_layers(config)
        self.model = LlamaModel(
            config, max_position, qkv_bias, self.qk_norm, multipliers=multipliers, nope_layers=nope_layers
        )
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    @classmethod
    def multipliers(cls, config: Any) -> Multipliers:
        """The scalars this family puts on the residual stream (none for Llama)."""
        return Multipliers()

    @classmethod
    def nope_layers(cls, config: Any) -> frozenset[int]:
        """The layers that apply no rotary embedding (none for Llama)."""
        return frozenset()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)
