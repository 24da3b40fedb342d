"""DeepSeek's kv_b_proj in an fp8 checkpoint (DeepSeek-V3 / R1's own release: block-wise, `weight_scale_inv`):
dequantized as it loads.

MLA never runs kv_b_proj as a projection: its per-head blocks are the absorbed W_UK / W_UV (deepseek_mla.py), two
batched matmuls a step in the model dtype, so the layer (`HeadRows`) holds the model dtype whatever the checkpoint
(as vLLM dequantizes it too). The fp8 weight and its scale pass here as a pair, in either order, and leave as one
fp32 weight = value x its scale: per tile of the checkpoint's `weight_block` (the quantization_config's block size),
else per output row ([n] or [n, 1]) or one per tensor. Every other tensor passes through unchanged, a kv_b_proj
stored unquantized (ignored by the quantization_config) included. A weight whose scale never comes, a scale whose
weight never comes or is not fp8, and a scale grid of the wrong shape are ValueErrors naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from treadle_ir.ops.fp8 import FP8_DTYPE
from treadle_ir.ops.fp8_block import dequantize_blocks, num_blocks
from treadle_model_runner.models.base import WEIGHT_SCALE_NAMES

LATENT_UP = ".kv_b_proj"


def dequantize(
    name: str, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> torch.Tensor:
    """fp32 [n, k]: the fp8 `weight` (checkpoint tensor `name`) times its scales (module docstring)."""
    n, k = weight.shape
    if block is not None:
        grid = (num_blocks(n, block[0]), num_blocks(k, block[1]))
        if tuple(scale.shape) != grid:
            raise ValueError(
                f"checkpoint tensor {name!r}: a weight of shape {(n, k)} in blocks of {block} takes a scale grid of "
                f"{grid}, the file holds {tuple(scale.shape)}"
            )
        return dequantize_blocks(weight, scale, *block)
    if scale.numel() == 1:
        return weight.float() * scale.float().reshape(())
    if scale.numel() == n:
        return weight.float() * scale.float().reshape(n, 1)
    raise ValueError(
        f"checkpoint tensor {name!r}: a weight of shape {(n, k)} takes one scale or one per row ({n}), the file "
        f"holds {tuple(scale.shape)}"
    )


def dequantized_latent_up(
    weights: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` with each fp8 kv_b_proj weight and its scale replaced by the dequantized weight."""
    held: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        prefix, _, attr = name.rpartition(".")
        fp8_weight = attr == "weight" and tensor.dtype == FP8_DTYPE
        if not prefix.endswith(LATENT_UP) or not (fp8_weight or attr in WEIGHT_SCALE_NAMES):
            yield name, tensor
            continue
        held[name] = tensor
        scale = next((f"{prefix}.{s}" for s in WEIGHT_SCALE_NAMES if f"{prefix}.{s}" in held), None)
        if f"{prefix}.weight" in held and scale is not None:
            weight = held.pop(f"{prefix}.weight")
            yield f"{prefix}.weight", dequantize(f"{prefix}.weight", weight, held.pop(scale), block)
    for name in held:
        missing = "its scale" if name.endswith(".weight") else "an fp8 weight beside it"
        raise ValueError(f"checkpoint tensor {name!r} comes without {missing}: the files are incomplete")
