"""gpt-oss's expert biases and activation on a FusedMoE: their storage, loading, and what a forward hands the kernel.

A FusedMoE built with `bias=True` holds, beside its stacked weights (layer.py), `w13_bias` [E_local, 2N] (columns
0..N-1 the gate projection's bias, N..2N-1 the up projection's: the order of w13's rows) and `w2_bias` [E_local, K],
in the weights' dtype, zero until loaded. They load like the weights: `weight_loader(param, tensor, name, shard_id,
expert_id)` with a global expert id and shard "w1" (gate bias [N]), "w3" (up bias [N]) or "w2" (down bias [K]);
another rank's expert is ignored (expert parallelism). A tensor-parallel layer (model-runner's ParallelFusedMoE) is
handed its columns of the gate / up biases, like the weights' rows, and the whole down bias; since the ranks'
outputs are summed, only one rank adds it (`FusedMoE.adds_w2_bias`, overridden there).

`layer_epilogue` is what the forward passes to the kernel (experts/epilogue.py): the biases and the swigluoai
constants, or None for a plain layer (whose kernels then compile and run as before). Quantized experts have no
bias or swigluoai epilogue, so `check_unquantized` refuses an fp8 or 4-bit layout for such a layer when it is set
(online `quantization="fp8"`, an fp8 or 4-bit checkpoint), and the oracle refuses it again at the first forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from treadle_moe.experts.epilogue import ExpertEpilogue, quantized_support_reason

if TYPE_CHECKING:
    from treadle_moe.layer import FusedMoE

__all__ = [
    "allocate_biases",
    "check_unquantized",
    "describe_epilogue",
    "layer_epilogue",
]


def allocate_biases(moe: FusedMoE, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """Zeroed `w13_bias` [E_local, 2N] and `w2_bias` [E_local, K] in `dtype` (None: the default dtype)."""
    e, k, n = moe.placement.num_local, moe.hidden_size, moe.intermediate_size
    for name, shape in (("w13_bias", (e, 2 * n)), ("w2_bias", (e, k))):
        param = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
        param.weight_loader = moe.weight_loader  # type: ignore[attr-defined]
        setattr(moe, name, param)


def layer_epilogue(moe: FusedMoE) -> ExpertEpilogue | None:
    """The kernel's epilogue for `moe`'s next forward; None without biases and swigluoai."""
    if moe.w13_bias is None and moe.activation != "swigluoai":
        return None
    w2_bias = moe.w2_bias if moe.adds_w2_bias() else None
    return ExpertEpilogue(moe.w13_bias, w2_bias, moe.swiglu_alpha, moe.swiglu_limit)


def describe_epilogue(moe: FusedMoE) -> str:
    """The swigluoai constants and the biases for `extra_repr` ("" for a plain layer)."""
    swiglu = f"(alpha={moe.swiglu_alpha}, limit={moe.swiglu_limit})" if moe.activation == "swigluoai" else ""
    return swiglu + (", bias=True" if moe.w13_bias is not None else "")


def check_unquantized(moe: FusedMoE, weights: str) -> None:
    """Refuse `weights` ("fp8" / "4-bit") experts for a layer with biases or swigluoai (ValueError)."""
    why = quantized_support_reason(weights, moe.activation, moe.w13_bias is not None)
    if why is not None:
        raise ValueError(f"MoE layer ({moe.extra_repr()}): {why}")
