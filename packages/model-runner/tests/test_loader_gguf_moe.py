"""GGUF -> HF conversion of sparse MoE models (Qwen3-MoE, Mixtral), from tiny random HF models built here.

Each HF model is written as llama.cpp lays it out: per layer the router `ffn_gate_inp` and the experts stacked
into `ffn_{gate,up,down}_exps` [experts, out, in]; Mixtral is a "llama" file with `expert_count` and llama.cpp's
q/k row permutation. The converted directory must load in transformers and give the original model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from test_loader_gguf import add_tokenizer, llama_cpp_permute, vocab_tokens

from treadle_model_runner.loader import convert_gguf

EXPERTS, TOP_K, LAYERS = 4, 2, 2


def _hf_model(kind: str) -> Any:
    common = dict(
        vocab_size=len(vocab_tokens()), hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if kind == "qwen3moe":
        config = tf.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=96, moe_intermediate_size=48, num_experts=EXPERTS,
            norm_topk_prob=True,
        )  # fmt: skip
    else:
        config = tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=EXPERTS)
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _write_gguf(path: Path, kind: str, hf: Any, tmp: Path) -> None:
    hf.save_pretrained(tmp)  # per-expert tensor names, as checkpoints store them
    state = {k: v for f in sorted(tmp.glob("*.safetensors")) for k, v in load_file(f).items()}
    c = hf.config
    arch = "qwen3moe" if kind == "qwen3moe" else "llama"
    moe = "mlp" if kind == "qwen3moe" else "block_sparse_moe"
    projs = ("gate_proj", "up_proj", "down_proj") if kind == "qwen3moe" else ("w1", "w3", "w2")
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(
        c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta
    )
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(TOP_K)
    if kind == "qwen3moe":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    add_tokenizer(writer)

    def add(name: str, w: torch.Tensor) -> None:
        writer.add_tensor(name, w.float().contiguous().numpy())

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    for i in range(LAYERS):
        h = f"model.layers.{i}."
        q, k = state[h + "self_attn.q_proj.weight"], state[h + "self_attn.k_proj.weight"]
        if arch == "llama":  # llama.cpp permutes q/k rows for its rope
            q, k = llama_cpp_permute(q, c.num_attention_heads), llama_cpp_permute(k, c.num_key_value_heads)
        add(f"blk.{i}.attn_q.weight", q)
        add(f"blk.{i}.attn_k.weight", k)
        add(f"blk.{i}.attn_v.weight", state[h + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", state[h + "self_attn.o_proj.weight"])
        add(f"blk.{i}.attn_norm.weight", state[h + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", state[h + "post_attention_layernorm.weight"])
        if kind == "qwen3moe":
            add(f"blk.{i}.attn_q_norm.weight", state[h + "self_attn.q_norm.weight"])
            add(f"blk.{i}.attn_k_norm.weight", state[h + "self_attn.k_norm.weight"])
        add(f"blk.{i}.ffn_gate_inp.weight", state[f"{h}{moe}.gate.weight"])
        for gguf_name, proj in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), projs, strict=True):
            stacked = torch.stack([state[f"{h}{moe}.experts.{e}.{proj}.weight"] for e in range(EXPERTS)])
            add(f"blk.{i}.{gguf_name}.weight", stacked)  # [experts, out, in]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral"])
def test_moe_gguf_converts_to_the_same_hf_model(tmp_path: Path, kind: str) -> None:
    hf = _hf_model(kind)
    path = tmp_path / f"{kind}.gguf"
    (tmp_path / "saved").mkdir()
    _write_gguf(path, kind, hf, tmp_path / "saved")
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf(path, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__]
    experts_key = "num_experts" if kind == "qwen3moe" else "num_local_experts"
    assert config[experts_key] == EXPERTS and config["num_experts_per_tok"] == TOP_K
    loaded: Any = tf.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(3, config["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
