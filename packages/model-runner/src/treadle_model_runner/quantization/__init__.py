"""Quantized projections: fp8 weights (float8_e4m3fn with one fp32 scale per output channel, per tensor, or per
weight tile) run by `ops.fp8_linear` or, block-wise, `ops.fp8_block_linear`; 4-bit weight-only checkpoints (AWQ,
GPTQ, compressed-tensors W4A16) run by `ops.w4a16_linear`.

- plan.py: what to do, decided before anything loads (`resolve_quantization`): nothing, quantize online, or load
  an fp8 checkpoint as it is; refusals name the field and the fix.
- online.py: `quantization="fp8"` on an unquantized checkpoint: quantize every projection after loading.
- scheme.py: the fp8 checkpoint formats (compressed-tensors, quant_method fp8) read from config.json
  (compressed_tensors.py: that format's config groups).
- blocks.py: block-wise layouts' block sizes per projection, refused where stacking or tensor parallelism splits a
  block.
- checkpoint.py: loading such a checkpoint's bytes and scales without a model-dtype copy.
- int4_scheme.py, int4_formats.py, int4_checkpoint.py: the 4-bit formats' config.json fields, their tensors turned
  into treadle's one 4-bit layout, and loading them (the projections' side: layers/linear_int4.py).
"""

from __future__ import annotations

from treadle_model_runner.quantization.checkpoint import allocate_projections, checkpoint_weights, log_loaded
from treadle_model_runner.quantization.int4_scheme import Int4CheckpointScheme
from treadle_model_runner.quantization.online import quantize_model, weight_bytes
from treadle_model_runner.quantization.plan import QuantizationPlan, resolve_quantization
from treadle_model_runner.quantization.scheme import Fp8CheckpointScheme, parse_quantization_config

__all__ = [
    "Fp8CheckpointScheme",
    "Int4CheckpointScheme",
    "QuantizationPlan",
    "allocate_projections",
    "checkpoint_weights",
    "log_loaded",
    "parse_quantization_config",
    "quantize_model",
    "resolve_quantization",
    "weight_bytes",
]
