"""Test helper (no tests here): write a tiny HF model as a GGUF file the way llama.cpp's convert_hf_to_gguf.py
does, independently of treadle's reader.

Tensor names come from gguf-py's TensorNameMap (the converter's own renaming table, not treadle's); the rest is
the converter's per-family behaviour, re-implemented here from its model classes: the Llama family's q/k rows
permuted for llama.cpp's rope (LlamaModel, GraniteModel), Gemma's norm weights stored plus 1, MoE experts
stacked [experts, out, in], Phi-3's fused projections stored as they are and its longrope factors as tensors,
tied heads not written; the metadata each class writes and nothing else (e.g. no attention scale for Gemma,
which llama.cpp derives). Tensors named in `quantize` are stored as Q8_0; the returned dict holds, for each of
them, the HF-layout values a reader must recover (dequantized from the block format's definition, the
permutation undone through an index map).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from test_loader_gguf import add_tokenizer, llama_cpp_permute, ref_dequant_q8_0

PERMUTED = ("llama", "granite", "smollm3")  # LlamaModel and its subclasses permute q/k
GEMMA = ("gemma2", "gemma3")


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    params = config.rope_parameters
    return params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params


def _metadata(writer: Any, arch: str, c: Any) -> None:
    """What the converter's set_gguf_parameters writes for this family."""
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = _rope(c)
    if arch != "gemma2":  # Gemma2Model writes no rope base (llama.cpp's default, 10000, is HF's)
        writer.add_rope_freq_base(rope["rope_theta"])
    if arch in GEMMA:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
    if arch == "gemma3":
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_freq_base_swa(_rope(c, "sliding_attention")["rope_theta"])
        if c.final_logit_softcapping:
            writer.add_final_logit_softcapping(c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
    if arch == "phi3":
        head_dim = c.hidden_size // c.num_attention_heads
        writer.add_rope_dimension_count(
            int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        )
        writer.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        writer.add_sliding_window(c.sliding_window or 0)
        if rope.get("long_factor"):
            scale = c.max_position_embeddings / c.original_max_position_embeddings
            original = c.original_max_position_embeddings
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
            )
        assert head_dim * c.num_attention_heads == c.hidden_size
    if arch in PERMUTED:
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    if arch == "granite":
        writer.add_attention_scale(c.attention_multiplier)
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_logit_scale(c.logits_scaling)
    if arch == "qwen2moe":
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)


def _checkpoint(hf: Any) -> dict[str, torch.Tensor]:
    """The tensors of hf's save_pretrained checkpoint (what the converter reads: per-expert names, no tied head)."""
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return {k: v for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(f).items()}


def _stack_experts(state: dict[str, torch.Tensor], c: Any) -> dict[str, torch.Tensor]:
    """Qwen2MoeModel.modify_tensors: each layer's experts merged into mlp.experts.{proj}.weight [experts, out, in]."""
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for i in range(c.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = [state[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(c.num_experts)]
            out[f"model.layers.{i}.mlp.experts.{proj}.weight"] = torch.stack(parts)
    return out


def write_llama_cpp_gguf(
    path: Path,
    arch: str,
    hf: Any,
    quantize: frozenset[str] = frozenset(),
    split_qkv: bool = False,
    tokenizer: Callable[[Any], None] = add_tokenizer,
) -> dict[str, torch.Tensor]:
    """Write `hf` (a tiny HF model of llama.cpp architecture `arch`) to `path` as llama.cpp's converter would;
    return {HF name: values a reader must get back} for the tensors stored quantized. `split_qkv`: Phi-3's
    qkv_proj as three tensors attn_q, attn_k, attn_v instead (which llama.cpp's loader also takes). `tokenizer`
    writes the tokenizer metadata (default: test_loader_gguf's byte-level BPE one)."""
    c = hf.config
    state = _checkpoint(hf)
    if arch == "qwen2moe":
        state = _stack_experts(state, c)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    _metadata(writer, arch, c)
    tokenizer(writer)
    recovered: dict[str, torch.Tensor] = {}
    for hf_name, w in state.items():
        w = w.float()
        n_head = None
        if arch in PERMUTED and ".q_proj." in hf_name:
            n_head = c.num_attention_heads
        elif arch in PERMUTED and ".k_proj." in hf_name:
            n_head = c.num_key_value_heads
        stored = llama_cpp_permute(w, n_head) if n_head else w
        if arch in GEMMA and hf_name.endswith("norm.weight"):
            stored = stored + 1
        if split_qkv and hf_name.endswith("qkv_proj.weight"):
            head_dim = c.hidden_size // c.num_attention_heads
            sizes = [c.num_attention_heads * head_dim] + [c.num_key_value_heads * head_dim] * 2
            for part, rows in zip(("attn_q", "attn_k", "attn_v"), stored.split(sizes), strict=True):
                layer = hf_name.split(".")[2]
                writer.add_tensor(f"blk.{layer}.{part}.weight", rows.contiguous().numpy())
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"gguf-py maps no name for {hf_name}"
        if hf_name not in quantize:
            writer.add_tensor(gguf_name, stored.contiguous().numpy())
            continue
        raw = gguf.quants.quantize(stored.contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        values = ref_dequant_q8_0(raw, tuple(w.shape))
        if n_head:
            order = llama_cpp_permute(torch.arange(w.shape[0], dtype=torch.float64), n_head).long()
            values = values[torch.argsort(order)]
        recovered[hf_name] = values
    rope = _rope(c)
    if arch == "phi3" and rope.get("long_factor"):
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return recovered
