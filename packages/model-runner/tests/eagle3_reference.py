"""Test helpers (no tests here): the EAGLE-3 head's math in plain torch, independent of treadle's modules, and a
tiny trainer built on it.

The head runs over rows in order, each row attending to itself and the rows before it (what the paged KV holds):
row p pairs embed(token at p + 1) with a hidden state for position p, rotary at p, and its output predicts the
token at p + 2 (models/llama_eagle3.py states the same math; this file does not import it). The target's features
come from HF transformers' own hidden states: `hidden_states[i]` is the residual stream entering layer i.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def aux_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM's default EAGLE-3 taps of a target with `num_layers` layers."""
    return (2, num_layers // 2, num_layers - 3)


def target_features(hf_target: Any, ids: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """[B, T, 3 * H] the residual streams entering `layers` of `hf_target` (transformers) over `ids` [B, T]."""
    with torch.no_grad():
        states = hf_target(ids, output_hidden_states=True).hidden_states
    return torch.cat([states[i] for i in layers], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [..., T, heads, d] rotated at positions [..., T] (Llama's halves convention)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = (positions.to(torch.float64)[..., None] * inv).to(x.dtype)[..., None, :]  # [..., T, 1, d / 2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def head_rows(
    w: dict[str, torch.Tensor],
    config: dict[str, Any],
    embeds: torch.Tensor,
    hidden: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The head's outputs [..., T, H] (before its final norm) for rows of embeds and hidden states [..., T, H]."""
    eps, heads, kv_heads = (
        config["rms_norm_eps"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    d = config["hidden_size"] // heads
    normed = _rms(hidden, w["midlayer.hidden_norm.weight"], eps)
    x = torch.cat([_rms(embeds, w["midlayer.input_layernorm.weight"], eps), normed], dim=-1)
    shape = x.shape[:-1]
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(*shape, heads, d)
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(*shape, kv_heads, d)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(*shape, kv_heads, d)
    theta = config["rope_theta"]
    q, k = _rope(q, positions, theta), _rope(k, positions, theta)
    k = k.repeat_interleave(heads // kv_heads, dim=-2)
    v = v.repeat_interleave(heads // kv_heads, dim=-2)
    scores = torch.einsum("...qhd,...khd->...hqk", q, k) / d**0.5
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    attn = torch.einsum("...hqk,...khd->...qhd", probs, v).reshape(*shape, heads * d)
    # norm_before_residual (the speculators format's default): the normed hidden state joins the residual stream
    residual = normed if config.get("norm_before_residual") else hidden
    h = residual + attn @ w["midlayer.self_attn.o_proj.weight"].T
    m = _rms(h, w["midlayer.post_attention_layernorm.weight"], eps)
    gate, up = m @ w["midlayer.mlp.gate_proj.weight"].T, m @ w["midlayer.mlp.up_proj.weight"].T
    return h + (F.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T


def head_logits(w: dict[str, torch.Tensor], config: dict[str, Any], out: torch.Tensor) -> torch.Tensor:
    """[..., draft_vocab] logits of the head's outputs."""
    return _rms(out, w["norm.weight"], config["rms_norm_eps"]) @ w["lm_head.weight"].T


def to_target(w: dict[str, torch.Tensor], draft_ids: torch.Tensor) -> torch.Tensor:
    return draft_ids + w["d2t"][draft_ids]


def train_head(
    w: dict[str, torch.Tensor],
    config: dict[str, Any],
    embedding: torch.Tensor,
    ids: torch.Tensor,
    features: torch.Tensor,
    first_label: int,
    steps: int,
    lr: float = 3e-3,
) -> None:
    """Fit `w` (in place; a draft vocabulary equal to the target's) so that row p of each sequence in `ids`
    [B, T] (features [B, T, 3H]) predicts the token at p + 2, for labels at positions >= `first_label`; then,
    as EAGLE-3's training-time test, so that the same rows fed the head's own output at p - 1 predict it too."""
    params = {k: v.clone().requires_grad_(True) for k, v in w.items() if v.is_floating_point()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    n = ids.shape[1]
    embeds = embedding[ids[:, 1:]]  # [B, T - 1, H]: row p's token is at p + 1
    positions = torch.arange(n - 1)
    labels = ids[:, 2:]  # row p predicts p + 2 (the last row has no label)
    keep = torch.arange(2, n) >= first_label
    for _ in range(steps):
        hidden = features[:, :-1] @ params["fc.weight"].T
        out = head_rows(params, config, embeds, hidden, positions)
        loss = F.cross_entropy(head_logits(params, config, out[:, :-1])[:, keep].flatten(0, 1),
                               labels[:, keep].flatten())  # fmt: skip
        # the head fed its own output (a drafting pass): row p's hidden state is the output at p - 1
        own = torch.cat([hidden[:, :1], out[:, :-1]], dim=1)
        again = head_rows(params, config, embeds, own, positions)
        loss = loss + F.cross_entropy(head_logits(params, config, again[:, :-1])[:, keep].flatten(0, 1),
                                      labels[:, keep].flatten())  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for k, v in params.items():
            w[k].copy_(v)
