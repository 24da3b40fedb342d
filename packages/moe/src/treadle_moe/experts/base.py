"""The Experts contract: the expert MLPs of one MoE layer applied to already-routed tokens.

An implementation declares what it can run (activation format, dtypes, activations, device types), the scratch
memory it needs for a problem size, and where the top_k weighting and reduction happen; the modular kernel
allocates the scratch from the workspace manager and calls `apply`.

Sizes: M tokens (BATCHED: rows per expert slab), K hidden size, N expert intermediate size, E experts.
Weights: w13 [E, 2N, K] (rows 0..N-1 the gate projection, rows N..2N-1 the up projection), w2 [E, K, N]; an
expert computes `y = w2[e] @ act(w13[e][:N] @ x) * (w13[e][N:] @ x)`; an `ExpertEpilogue` (`epilogue`, gpt-oss,
experts/epilogue.py) adds biases (w13's before the activation, w2's before the routing weight) and carries the
swigluoai constants, for model-dtype weights only. A slot whose expert id is -1 (expert
parallelism: another rank holds that expert, treadle_moe/placement.py) contributes zero. fp8 weights (float8_e4m3fn)
come with their scales (`fp8`, an `Fp8ExpertScales`: per channel or block-wise, experts/fp8.py) and compute
`expert_mlp_fp8`; an implementation says which layouts it runs through `support_reason`. 4-bit weights (`int4`,
W4A16) are packed int32 w13 [E, K / 8, 2N] / w2 [E, N / 8, K] with an `Int4ExpertScales` and compute
`expert_mlp_int4` (experts/int4.py). MXFP4 weights (`mxfp4`, gpt-oss) are uint8 blocks w13 [E, 2N, K / 32, 16] /
w2 [E, K, N / 32, 16] with `Mxfp4ExpertScales` (experts/mxfp4.py); they run the model-dtype MLP, epilogue included,
on their exactly dequantized weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from treadle_moe.experts.epilogue import ExpertEpilogue
from treadle_moe.experts.fp8 import Fp8ExpertScales, Fp8Layout
from treadle_moe.experts.int4 import Int4ExpertScales, Int4Layout, int4_expert_sizes
from treadle_moe.experts.mxfp4 import Mxfp4ExpertScales, mxfp4_expert_sizes
from treadle_moe.prepare_finalize import ActivationFormat
from treadle_moe.topk_weight_and_reduce import TopKWeightAndReduce


@dataclass(frozen=True, slots=True)
class WorkspaceShapes:
    """Scratch an Experts implementation needs, in elements of the activation dtype."""

    workspace13: tuple[int, ...]  # scratch of the w13 GEMM + activation
    workspace2: tuple[int, ...]  # scratch of the w2 GEMM
    output: tuple[int, ...]  # shape of the `output` apply writes (what finalize consumes)


class Experts(ABC):
    """Runs the routed expert MLPs. Subclasses set the class attributes and implement the three methods."""

    name: str = "abstract"
    activation_format: ActivationFormat = ActivationFormat.STANDARD
    supported_dtypes: frozenset[torch.dtype] = frozenset()
    supported_activations: frozenset[str] = frozenset()
    supported_device_types: frozenset[str] = frozenset()

    @classmethod
    def support_reason(
        cls,
        device_type: str,
        dtype: torch.dtype,
        activation: str,
        fp8: Fp8Layout | None = None,
        int4: Int4Layout | None = None,
    ) -> str | None:
        """None when this implementation runs the case (`fp8` / `int4`: the weights' fp8 or 4-bit layout, None for
        model-dtype weights); otherwise why not (for the oracle's report)."""
        if device_type not in cls.supported_device_types:
            return f"{cls.name} does not run on {device_type} (runs on {', '.join(sorted(cls.supported_device_types))})"
        if dtype not in cls.supported_dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in cls.supported_dtypes))
            return f"{cls.name} does not support {str(dtype).removeprefix('torch.')} (supports {names})"
        if activation not in cls.supported_activations:
            return f"{cls.name} does not support activation {activation!r} (supports {', '.join(sorted(cls.supported_activations))})"
        return None

    @abstractmethod
    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, E: int) -> WorkspaceShapes:
        """Scratch and output shapes for this problem size."""

    @abstractmethod
    def weight_and_reduce(self) -> TopKWeightAndReduce:
        """Where the top_k weighting and sum happen (NoOp: done here; Delegate: finalize decides)."""

    @abstractmethod
    def apply(
        self,
        output: torch.Tensor,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        activation: str,
        expert_num_tokens: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        fp8: Fp8ExpertScales | None = None,
        int4: Int4ExpertScales | None = None,
        epilogue: ExpertEpilogue | None = None,
        mxfp4: Mxfp4ExpertScales | None = None,
    ) -> None:
        """Write the experts' output (shape `workspace_shapes(...).output`) into `output`; `fp8`: the scales of
        float8_e4m3fn w13 / w2; `int4`: the scales (zeros, g_idx) of packed 4-bit w13 / w2; `epilogue`: biases and
        swigluoai constants (model-dtype and MXFP4 weights only); `mxfp4`: the e8m0 scales of MXFP4 blocks."""

    def describe(self) -> str:
        return f"{self.name} ({self.activation_format.value} format)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_weights(hidden_size: int, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int]:
    """Validate w13 [E, 2N, K] / w2 [E, K, N] (packed 4-bit: int32 [E, K / 8, 2N] / [E, N / 8, K]; MXFP4: uint8
    [E, 2N, K / 32, 16] / [E, K, N / 32, 16]) against the hidden size; return (E, N)."""
    if w13.dtype == torch.uint8:
        num_experts, n, k = mxfp4_expert_sizes(w13, w2)
        if k != hidden_size:
            raise ValueError(f"MXFP4 expert weights hold {k} inputs, the hidden size is {hidden_size}")
        return num_experts, n
    if w13.dtype == torch.int32:
        num_experts, n, k = int4_expert_sizes(w13, w2)
        if k != hidden_size:
            raise ValueError(f"4-bit expert weights hold {k} inputs, the hidden size is {hidden_size}")
        return num_experts, n
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"w13 and w2 must be 3-D [E, 2N, K] / [E, K, N], got {tuple(w13.shape)} / {tuple(w2.shape)}"
        )
    num_experts, two_n, k = w13.shape
    n = two_n // 2
    if two_n % 2 or k != hidden_size or tuple(w2.shape) != (num_experts, hidden_size, n):
        raise ValueError(
            f"expert weights do not match hidden size {hidden_size}: w13 {tuple(w13.shape)} must be [E, 2N, K] "
            f"and w2 {tuple(w2.shape)} must be [E, K, N] (gate rows first, then up rows, in w13)"
        )
    return num_experts, n
