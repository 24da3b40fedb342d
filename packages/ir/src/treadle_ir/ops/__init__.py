"""The IR op vocabulary: ``from treadle_ir import ops`` then ``ops.rms_norm(x, weight, eps)``.

Every attribute is an :class:`treadle_ir.IrOp` that dispatches per call to the provider chosen for this
platform and configuration. Model code calls these, never kernels directly.
"""

from __future__ import annotations

from .activation import gelu_tanh_and_mul, silu_and_mul, swigluoai_and_mul
from .cache import reshape_and_cache
from .fp8 import fp8_linear, quantize_fp8_rows
from .fp8_block import fp8_block_linear, quantize_fp8_groups
from .int4 import w4a16_linear
from .linear import add_rms_norm_linear, gelu_tanh_and_mul_linear, linear, silu_and_mul_linear
from .norm import fused_add_rms_norm, fused_add_rms_norm_, gemma_rms_norm, rms_norm
from .rotary import rotary_embedding, rotary_embedding_
from .sampling import argmax_rows, token_logprobs

__all__ = [
    "add_rms_norm_linear",
    "argmax_rows",
    "fp8_block_linear",
    "fp8_linear",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "gelu_tanh_and_mul",
    "gelu_tanh_and_mul_linear",
    "gemma_rms_norm",
    "linear",
    "quantize_fp8_groups",
    "quantize_fp8_rows",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "rotary_embedding_",
    "silu_and_mul",
    "silu_and_mul_linear",
    "swigluoai_and_mul",
    "token_logprobs",
    "w4a16_linear",
]
