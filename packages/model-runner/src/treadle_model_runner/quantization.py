"""Online weight quantization (`ModelConfig.quantization`): which models take it, and quantizing a loaded model.

fp8 (vLLM's `quantization="fp8"` on an unquantized checkpoint): the weights load in the model dtype as always (from
a checkpoint, GGUF or dummy), then every dense projection (`layers.linear.Linear`: qkv, o, gate_up, down) is
quantized once to float8_e4m3fn with one fp32 scale per output channel (`Linear.quantize_fp8`); the embedding,
the lm_head and the norms stay in the model dtype, as in vLLM. The model-dtype copies are freed (and, on GPU,
handed back by the caching allocator), so the KV cache, sized after loading, gets that memory. The forward then
quantizes activations per token (`ops.fp8_linear`), which makes the fused norm/activation + projection paths
step aside for the quantized projections.

Refused with a ValueError before anything loads: mixture-of-experts models (their experts have no fp8 path), and
checkpoints whose config.json already has a `quantization_config` (pre-quantized weights are not read yet).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from treadle_model_runner.layers.linear import Linear

logger = logging.getLogger(__name__)

__all__ = ["check_quantization", "quantize_model", "weight_bytes"]


def check_quantization(quantization: str | None, hf_config: Any, model_cls: type) -> None:
    """ValueError when `model_cls` (for `hf_config`) cannot run with `quantization`; nothing for None."""
    if quantization is None:
        return
    existing = getattr(hf_config, "quantization_config", None)
    if existing is not None:
        method = (
            existing.get("quant_method")
            if isinstance(existing, dict)
            else getattr(existing, "quant_method", None)
        )
        raise ValueError(
            f"quantization {quantization!r}: this checkpoint is already quantized (its config.json has a "
            f"quantization_config, quant_method {method!r}) and pre-quantized checkpoints are not supported yet; "
            f"load the unquantized checkpoint with quantization {quantization!r}, which quantizes it at load"
        )
    if not getattr(model_cls, "supports_fp8", False):
        raise ValueError(
            f"quantization {quantization!r} is not supported for {model_cls.__name__}: its mixture-of-experts "
            "layers have no fp8 path yet; serve it without --quantization (dense models: Llama, Mistral, Qwen2, "
            "Qwen3, Gemma 3)"
        )


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
