"""The model families treadle converts from GGUF: per llama.cpp architecture, the HF model it becomes and how
llama.cpp's converter laid its tensors out.

Theory: a GGUF file names its family in ``general.architecture`` and its tensors ``blk.N.<short name>.weight``
(``token_embd``, ``output_norm``, ``output`` outside the layers). Which HF module each short name comes from is
gguf-py's TensorNameMap (gguf/tensor_mapping.py), the table llama.cpp's convert_hf_to_gguf.py renames with; it
differs per family, so each family here carries its own short name -> HF name table. What else the converter
does to a tensor (from convert_hf_to_gguf.py's model classes, facts we invert rather than code we copy):

- q/k rows are permuted for llama.cpp's rope only by ``LlamaModel`` and its subclasses (llama, Mistral, Mixtral,
  Granite, SmolLM3): ``permute_qk``. Qwen2/3, Qwen2-MoE, Qwen3-MoE, Gemma 2/3, Phi-3 and OLMo 2 are written as HF
  has them.
- Gemma 2/3 (``GemmaModel``, ``Gemma2Model``, ``Gemma3Model``): every tensor whose HF name ends in
  ``norm.weight`` (the four block norms, Gemma 3's q/k norms, the final norm) is stored plus 1, since Gemma's
  RMSNorm multiplies by 1 + w and llama.cpp's by w: ``norm_offset``. Embeddings are stored unscaled (both
  multiply by sqrt(hidden) at run time); Gemma 3's ``token_embd`` is cut to the tokenizer's vocabulary; no
  ``output`` tensor (tied). Block norms: input_layernorm ``attn_norm``, post_attention_layernorm
  ``post_attention_norm``, pre_feedforward_layernorm ``ffn_norm``, post_feedforward_layernorm ``post_ffw_norm``.
- Phi-3 (``Phi3MiniModel``): HF's fused ``qkv_proj`` (rows q, k, v) is ``attn_qkv`` and ``gate_up_proj`` (rows
  gate, up) is ``ffn_up``, both as stored; llama.cpp's loader also takes separate ``attn_q/k/v``, which
  ``fused`` stacks back. The longrope factors are the tensors ``rope_factors_long`` / ``rope_factors_short``
  (read into config.json by gguf_family_config.py, not weights).
- Sparse MoE: the router is ``ffn_gate_inp`` [experts, hidden], the experts stacked ``ffn_{gate,up,down}_exps``
  [experts, out, in]; Qwen2-MoE's shared expert is ``ffn_{gate,up,down}_shexp`` and its sigmoid gate
  ``ffn_gate_inp_shexp`` (HF [1, hidden]; llama.cpp's loader takes it as a vector of hidden, so either shape).
- OLMo 2: norms after each block, ``post_attention_norm`` and ``post_ffw_norm``; q/k norms over all heads.

Invariants: every table maps onto the names the family's HF checkpoints use, so the converted directory loads
in transformers and in treadle's model of the same name (models/registry.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# llama's blocks; most families differ from it in a few names only
_LLAMA_LAYERS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYERS = {
    **_LLAMA_LAYERS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_OLMO2_LAYERS = {
    **{k: v for k, v in _LLAMA_LAYERS.items() if k not in ("attn_norm", "ffn_norm")},
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_LAYERS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
_QWEN2MOE_LAYERS = {
    **_LLAMA_LAYERS,
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}


@dataclass(frozen=True, slots=True)
class GGUFArchitecture:
    hf_architecture: str  # the HF class written to config.json "architectures"
    model_type: str  # config.json "model_type"
    permute_qk: bool  # llama.cpp interleaved the q/k rows for its rope (Llama family only)
    layer_names: Mapping[str, str] = field(
        default_factory=lambda: _LLAMA_LAYERS
    )  # blk.N.<short> -> HF suffix
    norm_offset: float = 0.0  # llama.cpp stored each norm weight as HF's + this (Gemma: 1)
    # HF suffix -> the short names whose rows stack into it, in order (Phi-3 files with separate q, k, v)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    moe_block: str = "mlp"  # HF module name of a layer's MoE block (router `gate`, `experts.{e}`)
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # HF names of gate, up, down


GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", permute_qk=True),  # also Mistral GGUFs
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", permute_qk=False),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", "qwen3", permute_qk=False),
    "qwen3moe": GGUFArchitecture("Qwen3MoeForCausalLM", "qwen3_moe", permute_qk=False),
    "qwen2moe": GGUFArchitecture("Qwen2MoeForCausalLM", "qwen2_moe", False, _QWEN2MOE_LAYERS),
    "gemma2": GGUFArchitecture("Gemma2ForCausalLM", "gemma2", False, _GEMMA_LAYERS, norm_offset=1.0),
    "gemma3": GGUFArchitecture("Gemma3ForCausalLM", "gemma3_text", False, _GEMMA_LAYERS, norm_offset=1.0),
    "phi3": GGUFArchitecture(
        "Phi3ForCausalLM",
        "phi3",
        False,
        _PHI3_LAYERS,
        fused={"self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v")},
    ),
    "olmo2": GGUFArchitecture("Olmo2ForCausalLM", "olmo2", False, _OLMO2_LAYERS),
    "granite": GGUFArchitecture("GraniteForCausalLM", "granite", permute_qk=True),
    "smollm3": GGUFArchitecture("SmolLM3ForCausalLM", "smollm3", permute_qk=True),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)
# llama.cpp writes Mixtral as "llama" with `llama.expert_count` experts per layer
MIXTRAL = GGUFArchitecture(
    "MixtralForCausalLM", "mixtral", True, moe_block="block_sparse_moe", expert_projs=("w1", "w3", "w2")
)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# tensors only llama.cpp's rope reads: llama3 frequency factors (recomputed from config.json by the model) and
# Phi-3's longrope factors (copied into config.json)
ROPE_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
