"""SmolLM3 (`SmolLM3ForCausalLM`, SmolLM3-3B): the Llama decoder in which some layers apply no rotary embedding.

    h   = x + o_proj(attn(rope(q), rope(k), v))      no_rope_layers[i] == 1 (a RoPE layer)
    h   = x + o_proj(attn(q, k, v))                  no_rope_layers[i] == 0 (a NoPE layer: causality is its only
                                                     notion of position)
    out = h + down(silu(gate(norm_post(h))) * up(norm_post(h)))
`no_rope_layers` holds one flag per layer; transformers derives it, when config.json lacks it, as a NoPE layer every
`no_rope_layer_interval` layers (the 4th, 8th, ...: SmolLM3-3B's pattern). A NoPE layer hands its attention no
rope, so every backend takes its plain path there: no rotary op, and never the Triton fused rope + decode kernel,
also inside CUDA graphs (each layer's launches are captured as they run). With `use_sliding_window` and
`sliding_window` set, transformers makes the NoPE layers sliding (`layer_types`), which Llama's layers read.
Otherwise Llama's: `attention_bias`, `mlp_bias`, tied embeddings (SmolLM3-3B ties them), so LoRA, tensor
parallelism and quantization work as for Llama.
"""

from __future__ import annotations

from typing import Any

from treadle_model_runner.models.llama import LlamaForCausalLM


def _rope_flags(config: Any) -> list[int]:
    """`no_rope_layers` (1: the layer applies rope), or transformers' default from `no_rope_layer_interval`."""
    num_layers = int(config.num_hidden_layers)
    flags = getattr(config, "no_rope_layers", None)
    if flags is None:
        interval = int(getattr(config, "no_rope_layer_interval", 4))
        return [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) < num_layers:
        raise ValueError(
            f"no_rope_layers has {len(flags)} entries but the model has {num_layers} layers (num_hidden_layers): "
            "config.json needs one flag per layer (1: rope, 0: NoPE)"
        )
    return [int(f) for f in flags[:num_layers]]


class SmolLM3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def nope_layers(cls, config: Any) -> frozenset[int]:
        return frozenset(i for i, has_rope in enumerate(_rope_flags(config)) if not has_rope)
