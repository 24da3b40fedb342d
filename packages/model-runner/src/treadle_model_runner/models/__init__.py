"""Model definitions, written like the math; layers call IR ops, never kernels."""

from __future__ import annotations

from treadle_model_runner.models.base import CausalLM
from treadle_model_runner.models.gemma3 import Gemma3ForCausalLM
from treadle_model_runner.models.llama import LlamaForCausalLM
from treadle_model_runner.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM
from treadle_model_runner.models.registry import get_model_class, supported_architectures

__all__ = [
    "CausalLM",
    "Gemma3ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "get_model_class",
    "supported_architectures",
]
