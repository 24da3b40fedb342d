"""Multi-head latent attention (MLA: DeepSeek-V2, DeepSeek-V3/R1, Moonlight, Kimi-K2), in the absorbed form: multi-query
attention over one cached latent vector per token.

transformers' DeepseekV2Attention / DeepseekV3Attention, per token x (H heads, L = kv_lora_rank, R = qk_rope_head_dim,
D = qk_nope_head_dim, V = v_head_dim):
    q          = q_proj(x)  or  q_b_proj(rms(q_a_proj(x)))          [H, D + R] = [q_nope | q_pe]
    [c | k_pe] = kv_a_proj_with_mqa(x)                              c [L], k_pe [R] (one for every head)
    c          = kv_a_layernorm(c)
    k_h        = [W_UK_h c | rope(k_pe)],  v_h = W_UV_h c           kv_b_proj.weight = per head [W_UK_h [D, L]; W_UV_h [V, L]]
    o          = o_proj([softmax(scale * q_h . k_h) v_h for each h])
Absorbed (the same sums, regrouped): q_h . k_h = [q_nope_h W_UK_h | rope(q_pe_h)] . [c | rope(k_pe)], and the value
sum over the keys commutes with W_UV_h. So the cache holds, per token, ONE vector of L + R (576 in the real models)
[c | rope(k_pe)], and attention is MQA: num_kv_heads 1, head size L + R, each query head [q_nope_h W_UK_h |
rope(q_pe_h)], the value the same cached vector; of each head's output the first L dims times W_UV_h^T, then o_proj.
The layer (`Attention(shares_kv=True)`) stores that vector once (kv_cache.py): a 576-wide cache per token instead of
HF's H x (D + R + V). W_UK and W_UV are per-head views of kv_b_proj's weight (model dtype, no copies); the absorption
is two batched matmuls over the heads per step.

Rotary: rope applies to the R dims only. DeepSeek stores them as interleaved pairs (x0, x1), (x2, x3), ... (V2's
complex rotation; V3's `rope_interleave`, on by default), which is the non-neox layout of layers/rotary.py; V3 with
`rope_interleave` false rotates in halves (neox). Both q_pe and k_pe take the same layout, so q . k is HF's.
The softmax scale is HF's: (D + R) ** -0.5, times mscale(factor, mscale_all_dim)^2 under YaRN when the rope
parameters set `mscale_all_dim` (mscale = 0.1 * m * ln(factor) + 1); YaRN's attention factor scales cos/sin as in
rotary.py. q_a_layernorm and kv_a_layernorm use eps 1e-6, as transformers builds them (not rms_norm_eps).

Projections: x's two down-projections (q_a_proj or q_proj, and kv_a_proj_with_mqa) run as one stacked matmul
`fused_qkv_a_proj`, fused with the block's input norm. Tensor parallelism: each rank runs H / tp heads (q_proj or
q_b_proj and kv_b_proj cut by heads, o_proj row-parallel); the latent's projection and norms are replicated, so every
rank caches the same latent (num_kv_heads 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.layers.linear import RowParallelLinear, StackedLinear
from treadle_model_runner.layers.norm import RMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters
from treadle_model_runner.parallel import get_tp

# q_a_layernorm / kv_a_layernorm: transformers' DeepseekV2RMSNorm default
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config: Any) -> float:
    """transformers' `yarn_apply_mscale((D + R) ** -0.5)`: times mscale(factor, mscale_all_dim)^2 under a rope
    scaling whose parameters set mscale_all_dim."""
    scale = (int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim)) ** -0.5
    params = rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if params["rope_type"] != "default" and mscale_all_dim:
        factor = float(params["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * float(mscale_all_dim) * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def mla_rotary(config: Any, max_position: int) -> RotaryEmbedding:
    """The rope of the R dims (shared by every layer): interleaved pairs unless V3's rope_interleave is false."""
    interleaved = bool(getattr(config, "rope_interleave", True))
    params = rope_parameters(config)
    params.pop("partial_rotary_factor", None)
    return RotaryEmbedding(int(config.qk_rope_head_dim), max_position, params, is_neox=not interleaved)


def column_parallel(in_features: int, out_features: int) -> StackedLinear:
    """A projection whose output rows (whole heads) are cut across ranks, loaded from the checkpoint's whole tensor."""
    return StackedLinear(in_features, {"rows": out_features}, parallel=True)


class HeadRows(nn.Module):
    """kv_b_proj's weight [heads x rows_per_head, in]: never run as a projection, so not a `Linear` (quantization
    leaves it in the model dtype; an fp8 checkpoint's is dequantized as it loads: models/deepseek.py). Under tensor
    parallelism this rank keeps its heads' rows of the checkpoint's whole tensor."""

    def __init__(self, in_features: int, rows_per_head: int, num_heads: int) -> None:
        super().__init__()
        tp = get_tp()
        self.local_rows = tp.shard(num_heads, "num_attention_heads") * rows_per_head
        self.full_rows, self.rank = num_heads * rows_per_head, tp.rank
        self.weight = nn.Parameter(torch.empty(self.local_rows, in_features), requires_grad=False)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.full_rows, self.weight.shape[1])

    def take_shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank * self.local_rows : (self.rank + 1) * self.local_rows]


class MlaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        if getattr(config, "attention_bias", False):
            raise ValueError(
                "config.json sets attention_bias, which no DeepSeek-V2/V3 checkpoint uses (its q_a_proj, "
                "kv_a_proj_with_mqa and o_proj biases are not supported by treadle's MLA); set it to false"
            )
        tp, hidden = get_tp(), int(config.hidden_size)
        self.num_heads = tp.shard(int(config.num_attention_heads), "num_attention_heads")
        self.nope_dim, self.rope_dim = int(config.qk_nope_head_dim), int(config.qk_rope_head_dim)
        self.v_dim, self.latent_dim = int(config.v_head_dim), int(config.kv_lora_rank)
        q_lora_rank = config.q_lora_rank
        all_heads = int(config.num_attention_heads)
        q_width = all_heads * (self.nope_dim + self.rope_dim)
        kv_a = self.latent_dim + self.rope_dim
        # the latent (and q's down-projection) is the same on every rank: each keeps all of its rows
        if q_lora_rank is None:
            shards, replicas = {"q": q_width, "kv_a": kv_a}, {"kv_a": tp.size}
        else:
            shards, replicas = {"q_a": int(q_lora_rank), "kv_a": kv_a}, {"q_a": tp.size, "kv_a": tp.size}
        self.fused_qkv_a_proj = StackedLinear(hidden, shards, parallel=True, replicas=replicas)
        self.split_sizes = list(self.fused_qkv_a_proj.shard_sizes.values())
        self.q_a_layernorm = None if q_lora_rank is None else RMSNorm(int(q_lora_rank), LATENT_NORM_EPS)
        self.q_b_proj = None if q_lora_rank is None else column_parallel(int(q_lora_rank), q_width)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, LATENT_NORM_EPS)
        # never run as a projection: its per-head blocks are W_UK and W_UV (module docstring)
        self.kv_b_proj = HeadRows(self.latent_dim, self.nope_dim + self.v_dim, all_heads)
        self.o_proj = RowParallelLinear(all_heads * self.v_dim, hidden, bias=False)
        self.rotary_emb = rotary_emb
        self.attn = Attention(layer_idx, self.num_heads, kv_a, mla_softmax_scale(config), 1, shares_kv=True)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, D, L], W_UV [h, V, L]) of this rank's h heads: views of kv_b_proj's weight."""
        per_head = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        return per_head[:, : self.nope_dim], per_head[:, self.nope_dim :]

    def forward(self, qkv_a: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """qkv_a: fused_qkv_a_proj's output [T, q part + L + R] (the block runs it fused with its input norm)."""
        num_tokens = qkv_a.shape[0]
        q, kv_a = qkv_a.split(self.split_sizes, dim=-1)
        if self.q_b_proj is not None and self.q_a_layernorm is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = kv_a.split([self.latent_dim, self.rope_dim], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(num_tokens, -1), k_pe.contiguous())
        w_uk, w_uv = self.absorbed_weights()
        # [T, h, L]: each head's q_nope through its W_UK, one batched matmul over the heads
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        query = torch.cat([q_latent, q_pe.view(num_tokens, self.num_heads, self.rope_dim)], dim=-1)
        # [T, L + R]: the key and the value
        kv = torch.cat([self.kv_a_layernorm(latent.contiguous()), k_pe], dim=-1)
        # [T, h, L + R]
        out = self.attn(query.flatten(1), kv, kv).view(num_tokens, self.num_heads, -1)
        # [T, h, V]: each head's latent output through its W_UV
        heads = torch.bmm(out[..., : self.latent_dim].transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return self.o_proj(heads.reshape(num_tokens, self.num_heads * self.v_dim))
