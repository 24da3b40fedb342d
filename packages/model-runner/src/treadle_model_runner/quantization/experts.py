"""fp8 routed experts: the layout a MoE model's FusedMoE layers take, and giving it to them.

treadle_moe holds fp8 experts in two layouts (treadle_moe.experts.fp8): per channel (one scale per output row of
each expert; activations quantized per token) and block-wise (one scale per [block_n, block_k] tile; activations
per (token, block_k group)). Here:
- `quantize_experts` (online, after the weights are in): `quantization="fp8"` quantizes every expert per channel;
  dummy weights for a block-wise checkpoint's config.json block-wise with its block size;
- `allocate_experts` (an fp8 checkpoint, before its tensors load): fp8 storage in the checkpoint's layout for the
  experts it holds in fp8 (`Fp8CheckpointScheme.quantizes` of every expert's gate, up and down projection, as the
  files name them), the model dtype for those it leaves unquantized; a layer whose experts disagree is a ValueError.
  Block-wise checkpoints take the block layout; per-channel and per-tensor weight scales the per-channel one, a
  per-tensor scale broadcast to its rows (exact: the gate and up matrices of an expert keep their own scales, where
  vLLM requantizes both to the larger one), with static activations when the checkpoint has input scales (one per
  expert projection in the files, folded by the layer to one per GEMM: their maximum, as vLLM does).
Under tensor parallelism each rank holds N / tp of every expert's intermediate width N: block-wise, that slice must
be a whole number of blocks (block_n for the gate and up rows, block_k for the down columns), else a ValueError names
config.json's block field and its expert width field (`moe_intermediate_size`, Mixtral `intermediate_size`) and the
smaller tensor-parallel sizes that work, and expert parallelism. One rank holds whole experts, whose ragged last
blocks the kernels handle; so does each rank under expert parallelism (enable_expert_parallel), whatever the width.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from treadle_model_runner.layers.fp8_weights import WeightBlocks
from treadle_model_runner.quantization.blocks import weight_blocks
from treadle_model_runner.quantization.scheme import Fp8CheckpointScheme
from treadle_moe import Fp8Layout, FusedMoE

logger = logging.getLogger(__name__)

__all__ = ["allocate_experts", "quantize_experts"]


def _experts(model: nn.Module) -> list[tuple[str, FusedMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FusedMoE)]


def check_expert_blocks(model: nn.Module, name: str, moe: FusedMoE, blocks: WeightBlocks) -> None:
    """ValueError unless this rank's slice of the experts' intermediate width is a whole number of blocks."""
    tp = int(getattr(moe, "tp_size", 1))
    n, bn, bk = moe.intermediate_size, blocks.block_n, blocks.block_k
    if tp == 1 or (n % bn == 0 and n % bk == 0):
        return
    full = n * tp
    unit = math.lcm(bn, bk)
    sizes = [t for t in range(1, tp) if full % t == 0 and (full // t) % unit == 0]
    field = getattr(model, "expert_width_field", "moe_intermediate_size")
    raise ValueError(
        f"{blocks.source}: the experts of {name} cannot be cut for tensor parallelism in whole blocks: config.json's "
        f"{field} ({full}) / tensor_parallel_size ({tp}) = {n} columns per rank is not a multiple of the block "
        f"({bn} rows x {bk} columns); use tensor_parallel_size {' or '.join(map(str, sizes)) or '1'}, or expert "
        "parallelism (--enable-expert-parallel: each rank holds whole experts), or the model's unquantized "
        "checkpoint (--quantization fp8 quantizes its experts per channel)"
    )


def _layout(
    model: nn.Module, name: str, moe: FusedMoE, blocks: WeightBlocks | None, static: bool = False
) -> Fp8Layout:
    if blocks is None:
        return Fp8Layout(static_activations=static)
    check_expert_blocks(model, name, moe, blocks)
    return Fp8Layout((blocks.block_n, blocks.block_k))


def quantize_experts(model: nn.Module, blocks: WeightBlocks | None = None) -> int:
    """Quantize every FusedMoE of a loaded `model` in place: per channel, or block-wise with `blocks`; returns how
    many layers."""
    layers = _experts(model)
    for name, moe in layers:
        moe.quantize_fp8(_layout(model, name, moe, blocks))
    return len(layers)


def allocate_experts(model: nn.Module, scheme: Fp8CheckpointScheme, device: torch.device) -> int:
    """Storage for the FusedMoE layers of a model built on the meta device, in the dtypes the checkpoint holds
    (module docstring); returns how many layers are fp8."""
    blocks = weight_blocks(scheme)
    num_fp8 = 0
    for name, moe in _experts(model):
        held = {(e, p): scheme.quantizes(_checkpoint_name(model, name, e, p))
                for e in range(moe.num_experts) for p in _projections(model)}  # fmt: skip
        if all(held.values()):
            moe.allocate_fp8(_layout(model, name, moe, blocks, scheme.static_activations), device)
            num_fp8 += 1
        elif any(held.values()):
            fp8 = [_checkpoint_name(model, name, e, p) for (e, p), q in held.items() if q][:2]
            plain = [_checkpoint_name(model, name, e, p) for (e, p), q in held.items() if not q][:2]
            raise ValueError(
                f"the checkpoint's quantization_config makes {', '.join(fp8)} fp8 but leaves {', '.join(plain)} "
                f"unquantized; treadle runs the experts of {name} as one fused layer, which needs one weight format: "
                "ignore all of its experts or none"
            )
        else:
            moe.allocate(device)
    return num_fp8


def _projections(model: nn.Module) -> list[str]:
    return list(getattr(model, "expert_proj_names", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}))


def _checkpoint_name(model: nn.Module, moe_name: str, expert: int, proj: str) -> str:
    """An expert projection's HF module name as the files spell it (Mixtral: `block_sparse_moe.experts.3.w1`)."""
    name = f"{moe_name}.{expert}.{proj}"
    checkpoint_name = getattr(model, "checkpoint_name", None)
    return checkpoint_name(name) if checkpoint_name is not None else name
