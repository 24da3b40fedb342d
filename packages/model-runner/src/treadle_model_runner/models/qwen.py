"""Qwen2 / Qwen2.5 (bias on q, k, v) and Qwen3 (RMSNorm on each q and k head before rotary): Llama otherwise."""

from __future__ import annotations

from treadle_model_runner.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
