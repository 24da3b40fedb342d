"""Model building blocks; the arithmetic is in IR ops (`treadle_ir.ops`), weights and shapes live here."""

from __future__ import annotations

from treadle_model_runner.layers.attention import Attention
from treadle_model_runner.layers.linear import StackedLinear
from treadle_model_runner.layers.mlp import GatedMLP
from treadle_model_runner.layers.norm import GemmaRMSNorm, RMSNorm
from treadle_model_runner.layers.rotary import RotaryEmbedding, rope_parameters

__all__ = [
    "Attention",
    "GatedMLP",
    "GemmaRMSNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "StackedLinear",
    "rope_parameters",
]
