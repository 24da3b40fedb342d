"""Online weight quantization (`ModelConfig.quantization` on an unquantized checkpoint): quantizing a loaded model.

fp8 (vLLM's `quantization="fp8"` on an unquantized checkpoint): the weights load in the model dtype as always (from
a checkpoint, GGUF or dummy), then every dense projection (`layers.linear.Linear`: qkv, o, gate_up, down) is
quantized once to float8_e4m3fn with one fp32 scale per output channel (`Linear.quantize_fp8`); the embedding,
the lm_head and the norms stay in the model dtype, as in vLLM; a MoE model's routed experts are quantized per
channel too, the router kept (quantization/experts.py). The model-dtype copies are freed (and, on GPU,
handed back by the caching allocator), so the KV cache, sized after loading, gets that memory. The forward then
quantizes activations per token (`ops.fp8_linear`), which makes the fused norm/activation + projection paths
step aside for the quantized projections.

Dummy weights with a block-wise checkpoint's config.json (plan.py) are quantized the same way, but block-wise with
that checkpoint's block size (layers/fp8_weights.py: one scale per tile, `ops.fp8_block_linear` with activations
quantized per token group), so a benchmark runs the GEMM the real checkpoint would (the experts, too, block-wise); a
projection or expert slice whose stacking or tensor-parallel cuts split a block is the same ValueError as when
loading the checkpoint.

Which models take it, and what happens with a checkpoint that is already quantized, is plan.py's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from treadle_model_runner.layers import fp8_weights
from treadle_model_runner.layers.linear import Linear
from treadle_model_runner.quantization.blocks import checked_blocks, weight_blocks
from treadle_model_runner.quantization.experts import quantize_experts
from treadle_model_runner.quantization.scheme import Fp8CheckpointScheme

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


def quantize_model(model: nn.Module, quantization: str, blocks_of: Fp8CheckpointScheme | None = None) -> None:
    """Quantize every dense projection and routed expert of a loaded `model` in place (`quantization`: "fp8"): per
    channel, or block-wise as `blocks_of` (a block-wise checkpoint's scheme) says."""
    assert quantization == "fp8", f"unknown quantization {quantization!r} (ModelConfig validates it)"
    before = weight_bytes(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    for name, layer in layers:
        blocks = checked_blocks(layer, name, blocks_of) if blocks_of is not None else None
        fp8_weights.quantize_fp8(layer, blocks)
    num_experts = quantize_experts(model, weight_blocks(blocks_of) if blocks_of is not None else None)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the freed model-dtype weights go back to the device for the KV cache
    after = weight_bytes(model)
    block = blocks_of.weight_block if blocks_of is not None else None
    scales = f"{block[0]}x{block[1]} block scales" if block else "per-channel scales"
    logger.info(
        "quantization fp8: %d projections and %d expert layers to float8_e4m3fn with %s (embedding, lm_head, router "
        "and norms kept); weights %.1f MiB -> %.1f MiB", len(layers), num_experts, scales, before / (1 << 20),
        after / (1 << 20),
    )  # fmt: skip
