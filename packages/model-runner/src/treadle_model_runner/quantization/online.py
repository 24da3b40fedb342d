"""Online weight quantization (`ModelConfig.quantization` on an unquantized checkpoint): quantizing a loaded model.

fp8 (vLLM's `quantization="fp8"` on an unquantized checkpoint): the weights load in the model dtype as always (from
a checkpoint, GGUF or dummy), then every dense projection (`layers.linear.Linear`: qkv, o, gate_up, down) is
quantized once to float8_e4m3fn with one fp32 scale per output channel (`Linear.quantize_fp8`); the embedding,
the lm_head and the norms stay in the model dtype, as in vLLM. The model-dtype copies are freed (and, on GPU,
handed back by the caching allocator), so the KV cache, sized after loading, gets that memory. The forward then
quantizes activations per token (`ops.fp8_linear`), which makes the fused norm/activation + projection paths
step aside for the quantized projections.

Which models take it, and what happens with a checkpoint that is already quantized, is plan.py's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from treadle_model_runner.layers.linear import Linear

logger = logging.getLogger(__name__)

__all__ = ["quantize_model", "weight_bytes"]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantize_model(model: nn.Module, quantization: str) -> None:
    """Quantize every dense projection of a loaded `model` in place (`quantization`: "fp8")."""
    assert quantization == "fp8", f"unknown quantization {quantization!r} (ModelConfig validates it)"
    before = weight_bytes(model)
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer.quantize_fp8()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the freed model-dtype weights go back to the device for the KV cache
    after = weight_bytes(model)
    logger.info(
        "quantization fp8: %d projections to float8_e4m3fn with per-channel scales (embedding, lm_head and norms "
        "kept); weights %.1f MiB -> %.1f MiB", len(layers), before / (1 << 20), after / (1 << 20),
    )  # fmt: skip
